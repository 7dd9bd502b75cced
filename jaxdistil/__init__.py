"""jaxdistil: DistilBERT-style knowledge distillation in JAX/Flax."""

__version__ = "0.1.0"
