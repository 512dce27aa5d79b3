"""megatron_ki: Megatron-style 3D-parallel pre-training with Knowledge Inheritance on DeepSpeed."""

__version__ = "0.1.0"
