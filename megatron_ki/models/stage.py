"""One pipeline stage's share of a model, built alone (no DeepSpeed ``PipelineModule``).

Tools that run a frozen model split over pipeline stages by plain point-to-point sends (the offline teacher
precompute, ``megatron_ki/ki/precompute.py``) build each stage with :func:`build_stage`: only that stage's
modules are created, so a model too large for one device fits over ``pp`` of them. The first stage holds the
embedding, the last the final norm and the head (with its own copy of a tied embedding, as a training
pipeline's last stage does); layers are split evenly (:func:`stage_layer_range`).
"""

from __future__ import annotations

from torch.distributed import ProcessGroup

from megatron_ki.config import ModelConfig

from . import build_model
from .transformer import TransformerLanguageModel


def stage_layer_range(num_layers: int, pp: int, stage: int) -> tuple[int, int]:
    """Layers ``[a, b)`` of ``stage`` of ``pp``: an even split, the first ``num_layers % pp`` stages one more."""
    if not 0 <= stage < pp:
        raise ValueError(f"pipeline stage {stage} is outside 0..{pp - 1}")
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


def build_stage(
    cfg: ModelConfig, tp_group: ProcessGroup | None, pp: int, stage: int, seed: int = 0
) -> TransformerLanguageModel:
    """Stage ``stage`` of ``pp`` of the model on this tensor-parallel rank (pp = 1: the whole model)."""
    return build_model(
        cfg,
        tp_group=tp_group,
        seed=seed,
        layer_range=stage_layer_range(cfg.num_layers, pp, stage),
        pre_process=stage == 0,
        post_process=stage == pp - 1,
    )


def stage_source_names(model: TransformerLanguageModel) -> dict[str, str]:
    """``{stage state name: whole-model state name}``: blocks renumbered from the stage's first layer, and a
    last stage's tied head copy read from the embedding (a whole model's state dict has no copy)."""
    first = model.layer_range[0]
    out = {}
    for name in model.state_dict():
        source = name
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            source = f"layers.{int(idx) + first}.{rest}"
        elif name.startswith("head.word_embeddings."):
            source = name.replace("head.word_embeddings.", "embedding.word_embeddings.", 1)
        out[name] = source
    return out
