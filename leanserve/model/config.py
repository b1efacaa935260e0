"""One architecture-neutral description of a model, built from an HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # HF class name, e.g. "LlamaForCausalLM", "Gemma3ForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF form: {"rope_type": "linear"|"llama3", "factor": ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head of q and k (Qwen3, Gemma 3)
    hidden_act: str = "silu"
    # Sliding-window attention: per layer, None (full) or the window in tokens.
    layer_windows: tuple[int | None, ...] = field(default=())
    # Gemma 3
    rope_local_theta: float | None = None  # RoPE base of sliding-window layers
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (else head_dim ** -0.5)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")

    @property
    def is_gemma3(self) -> bool:
        return self.architecture.startswith("Gemma3")

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer, per token, at 2 bytes (bf16/fp16) or 4 (fp32): multiply by itemsize/1."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
        return self.num_layers * per_layer + v * h * (1 if self.tie_word_embeddings else 2)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """From a parsed HF ``config.json`` (text models; Gemma 3's nested ``text_config`` too)."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry")
        arch = archs[0]
        if "text_config" in cfg and arch == "Gemma3ForConditionalGeneration":
            cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
            arch = "Gemma3ForCausalLM"
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        num_layers = cfg["num_hidden_layers"]
        head_dim = cfg.get("head_dim") or hidden // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta", 10000.0)
        # transformers 5 folds rope settings into "rope_parameters"
        rp = cfg.get("rope_parameters")
        if isinstance(rp, dict):
            if "full_attention" in rp:  # Gemma 3: per layer type
                rope_theta = rp["full_attention"].get("rope_theta", rope_theta)
                local = rp.get("sliding_attention", {})
                cfg = {**cfg, "rope_local_base_freq": local.get("rope_theta", cfg.get("rope_local_base_freq"))}
                rp = rp["full_attention"]
            else:
                rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                rope_scaling = rp
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.setdefault("rope_type", rope_scaling.get("type", "default"))
            if rope_scaling["rope_type"] == "default":
                rope_scaling = None
        gemma3 = arch.startswith("Gemma3")
        windows: tuple[int | None, ...] = ()
        window = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        if layer_types:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        elif gemma3 and window:
            pattern = cfg.get("sliding_window_pattern", 6)
            windows = tuple(None if (i + 1) % pattern == 0 else window for i in range(num_layers))
        elif window and cfg.get("use_sliding_window", arch.startswith("Mistral")):
            windows = (window,) * num_layers
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", gemma3),
            attention_bias=cfg.get("attention_bias", arch.startswith("Qwen2")),
            qk_norm=gemma3 or arch.startswith("Qwen3"),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act", "silu"),
            layer_windows=windows,
            rope_local_theta=cfg.get("rope_local_base_freq", 10000.0) if gemma3 else None,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if gemma3 else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
