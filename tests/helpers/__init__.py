"""Helpers for tests: run functions on several gloo ranks, build tiny HF models."""
