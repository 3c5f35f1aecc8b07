"""Small utilities (metrics logging)."""
