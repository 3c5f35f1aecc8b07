"""HF <-> Megatron-Core conversion: declarative tables, named transforms, loaders and exporters."""

from dapo_megatron.conversion.hf_io import HFCheckpointReader
from dapo_megatron.conversion.hf_to_megatron import load_hf_into_megatron
from dapo_megatron.conversion.tables import TABLES, WeightMapping, mappings_for

__all__ = ["HFCheckpointReader", "TABLES", "WeightMapping", "load_hf_into_megatron", "mappings_for"]
