"""Registry of SAE architectures: a new architecture is one file plus one line here."""

from .base import SparseAutoencoder
from .batchtopk import BatchTopKSAE
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .relu_l1 import ReluL1SAE
from .topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    TopKSAE.name: TopKSAE,
    ReluL1SAE.name: ReluL1SAE,
    BatchTopKSAE.name: BatchTopKSAE,
    MatryoshkaSAE.name: MatryoshkaSAE,
    JumpReLUSAE.name: JumpReLUSAE,
    GatedSAE.name: GatedSAE,
}

__all__ = ["ARCHITECTURES", "SparseAutoencoder"]
