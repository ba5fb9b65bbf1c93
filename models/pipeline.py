"""The GPT as a DeepSpeed `PipelineModule`: a flat sequence of layers cut into pipeline stages.

Layers: [embedding (token + position, dropout)] + n_layer × [block] + [final LayerNorm] + [LM head]. With tied
embeddings (GPT §3.1) the first and last layer are one `TiedLayerSpec` key ("embed"): DeepSpeed builds the
embedding on both the first and the last stage, broadcasts the first stage's weights to the last at start-up,
and all-reduces the two stages' gradients of the tied weight after every backward pass, so both copies stay
equal — the pipeline equivalent of one shared matrix (Narayanan et al. 2021 / Megatron-LM handle tied
embeddings the same way). Stages exchange only the (B, T, C) hidden states; the loss runs on the last stage.

`to_pipeline(gpt, …)` wraps the modules of an existing (possibly tensor-parallel-sharded) GPT, so every rank
starts from the same weights; `stage_state_dict` maps a stage's parameters back to GPT names for export.
deepspeed is imported only inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.gpt import GPT, Block, attention_mask_4d

NAME_MAP_ATTR = "_raygpt_param_names"  # PipelineModule attribute: pipeline parameter name → GPT name


class EmbeddingPipe(nn.Module):
    """First layer: input_ids (B, T) → hidden (B, T, C); as the tied last layer, hidden → logits (`logits`)."""

    def __init__(self, wte: nn.Module, wpe: nn.Embedding | None, drop: nn.Dropout | None,
                 head: nn.Module | None = None) -> None:
        super().__init__()
        # The last stage's copy gets wpe=None: it only computes logits, and an unused position table there
        # would be a second, never-trained copy of transformer.wpe.
        self.wte, self.wpe, self.drop = wte, wpe, drop
        # Under tensor parallelism the head is a VocabParallelLMHead over the wte shard (no extra parameters
        # beyond that shard); otherwise the logits are a plain matmul with wte.
        self.head = head

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.wpe is None or self.drop is None:
            raise RuntimeError("EmbeddingPipe: this copy only computes logits (no position embedding)")
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.drop(self.wte(input_ids) + self.wpe(pos))

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(hidden) if self.head is not None else F.linear(hidden, self.wte.weight)


def _tied_logits(module: EmbeddingPipe, hidden: Tensor) -> Tensor:
    return module.logits(hidden)


class BlockPipe(nn.Module):
    """One transformer block with causal attention and no padding mask or cache (pretraining/SFT batches).

    Each block builds its own mask from its layer's window, so GPT-3's locally banded layers (Brown et al. 2020
    §2.1) stay banded on every stage; a dense layer gets None (SDPA's is_causal). Stages exchange only hidden
    states, so the mask cannot be built once and passed along as in `GPTModel.forward`.
    """

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        B, T = x.shape[:2]
        mask = attention_mask_4d(None, T, 0, self.block.attn.window, x.device, B)
        return self.block(x, mask)


class ModulePipe(nn.Module):
    """Wraps a module applied to the hidden states (final LayerNorm, untied LM head)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


def layer_specs(gpt: GPT) -> list[Any]:
    """DeepSpeed LayerSpec/TiedLayerSpec list for `gpt` (its modules are reused, not copied)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    body = gpt.transformer
    tied = gpt.config.tie_embeddings and gpt.lm_head.weight is body.wte.weight
    head = gpt.lm_head if tied and not isinstance(gpt.lm_head, nn.Linear) else None  # TP head
    embed_args = (body.wte, body.wpe, body.drop, head)
    specs: list[Any] = []
    if tied:
        specs.append(TiedLayerSpec("embed", EmbeddingPipe, *embed_args, tied_weight_attr=["wte.weight"]))
    else:
        specs.append(LayerSpec(EmbeddingPipe, *embed_args))
    specs.extend(LayerSpec(BlockPipe, block) for block in body.h)
    specs.append(LayerSpec(ModulePipe, body.ln_f))
    if tied:
        specs.append(TiedLayerSpec("embed", EmbeddingPipe, body.wte, None, None, head, forward_fn=_tied_logits,
                                   tied_weight_attr=["wte.weight"]))
    else:
        specs.append(LayerSpec(ModulePipe, gpt.lm_head))
    return specs


def to_pipeline(gpt: nn.Module, topology: Any, loss_fn: Callable[[Tensor, Any], Tensor],
                partition: str = "parameters", tp_group: Any = None) -> nn.Module:
    """A `deepspeed.pipe.PipelineModule` holding this rank's stage of `gpt`.

    topology: cluster.distributed.Topology (pp, dp, tp) — mapped to DeepSpeed's PipeModelDataParallelTopology,
    which lays ranks out the same way. partition: 'parameters' (balance parameter counts), 'uniform' (balance
    layer counts) or 'type:Block' (balance blocks). loss_fn(logits, labels) runs on the last stage.
    """
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if not isinstance(gpt, GPT):
        raise TypeError(f"pipeline parallelism supports the GPT language model, got {type(gpt).__name__}")
    names = {id(p): n for n, p in gpt.named_parameters()}
    if partition == "type:Block":
        partition = "type:BlockPipe"
    pipe = PipelineModule(
        layers=layer_specs(gpt), loss_fn=loss_fn, partition_method=partition,
        topology=PipeModelDataParallelTopology(num_pp=topology.pp, num_mp=topology.tp, num_dp=topology.dp))
    setattr(pipe, NAME_MAP_ATTR, {n: names[id(p)] for n, p in pipe.named_parameters() if id(p) in names})
    return pipe


def stage_state_dict(pipe: nn.Module, local: dict[str, Tensor]) -> dict[str, Tensor]:
    """This stage's tensors (keyed by the pipeline's parameter names) renamed to the GPT's names."""
    mapping: dict[str, str] = getattr(pipe, NAME_MAP_ATTR)
    return {mapping[n]: t for n, t in local.items() if n in mapping}
