"""Extra networks: LoRA / LyCORIS merged into a loaded model, and textual-inversion embeddings."""

from openldm.networks.embeddings import Embedding, load_embedding, parse_embedding
from openldm.networks.formats import LoadedNetwork, NetworkModule, load_network, parse_network
from openldm.networks.library import NetworkLibrary, find_files, network_refs, read_embeddings
from openldm.networks.lora import AppliedNetworks, NetworkReport, apply_networks

__all__ = [
    "AppliedNetworks", "Embedding", "LoadedNetwork", "NetworkLibrary", "NetworkModule", "NetworkReport",
    "apply_networks", "find_files", "load_embedding", "load_network", "network_refs", "parse_embedding",
    "parse_network", "read_embeddings",
]
