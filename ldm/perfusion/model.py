"""PerfusionLatentDiffusion: trains one concept by key-locked, gated rank-1 editing.

What is learned (Tewel et al. 2023, Sec. 4): the placeholder's word embedding and one value
output o*_V per cross-attention layer. Keys are locked to the superclass: o*_K = W_K i_super.
The target inputs i* and i_super are exponential moving averages of the text encodings at
the concept's position, over `target_templates` (default: the training set's template list, "a photo
of a {}", ...), not over the images' own captions: a user's few photos often share one caption, and
in a causal text encoder the concept token's encoding carries the words before it, so an i* averaged
over one caption is that caption's, and the gate (Eq. 3's sim against i*) half shuts in any other.
The image loss still reads each image's own caption. Everything else is frozen.

Gradient path (a choice the public implementations differ on): i* is a buffer, so no
gradient flows through it; the embedding learns through the prompt encodings e that the
edited projections receive. `gate_at` chooses where the gated edit applies in training:
"all" (Eq. 3 at every token, gradients through sim(e) everywhere), "all_detached" (the same
forward, sim(e) a constant for autograd away from the placeholder) or "concept" (the edit only
at the placeholder's token).

`method` selects the paper's ablations (Sec. 5, Fig. 9) with everything else unchanged:
"trained_keys" also learns one key output o*_K per layer (starting at W_K i_super) instead of
locking it; "embedding" learns only the word embedding with the edit off (textual inversion).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ldm.data.templates import TEMPLATES, fill
from ldm.errors import UserError
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.perfusion.concepts import METHODS, Concept, ConceptError, save_concept
from ldm.perfusion.covariance import load_covariance
from ldm.perfusion.edit import GATE_AT, ConceptBank, ConceptState, concept_gates, patch_cross_attention
from ldm.perfusion.gate_settings import GateSettings
from ldm.perfusion.prompts import check_prepared, single_token_id, superclass_token_ids, word_pattern
from ldm.util import fingerprint_tensors, repo_path, to_device


class DivergedError(UserError, FloatingPointError):
    """The loss became NaN or infinite (a learning rate too high, a bad setting): training stops."""


def _number(name: str, value, positive: bool = False) -> float:
    """A finite number from model.params, or a one-line error naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        kind = "a finite number > 0" if positive else "a finite number"
        raise UserError(f"model.params.{name} must be {kind}, got {value!r}")
    return float(value)


@dataclass
class _FitState:
    """What a training run keeps on the host, so that its steps need not wait for the device."""

    initialized: bool = False                                            # the device's `initialized`, once True
    frozen: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)   # (what, prompt) -> `frozen_encodings`
    diverged: torch.Tensor | bool = False                                # on the device: a non-finite loss since the last step


class PerfusionLatentDiffusion(LatentDiffusion):
    def __init__(
        self,
        *args,
        placeholder: str = "*",
        superclass: str = "teddy",
        covariance_path: str | None = None,
        covariance_captions: str = "data/captions.txt",
        covariance_max_captions: int = 2000,
        beta: float = 0.75,
        tau: float = 0.1,
        lr_o_v: float = 0.03,
        lr_embedding: float = 0.006,
        weight_decay: float = 0.0,
        ema_decay: float = 0.99,
        validation_prompts: Sequence[str] = ("a photo of a {}", "a {} on the beach"),
        log_sample_steps: int = 20,
        log_guidance_scale: float = 6.0,
        method: str = "perfusion",
        gate_at: str = "all",
        log_gates_every_n_steps: int = 50,
        gate_penalty: float = 0.0,
        target_templates: Sequence[str] | str | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if method not in METHODS:
            raise UserError(f"model.params.method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        if gate_at not in GATE_AT:
            raise UserError(f"model.params.gate_at must be one of {', '.join(GATE_AT)}, got {gate_at!r}")
        self.gate_at, self.log_gates_every_n_steps = gate_at, int(log_gates_every_n_steps)
        self.gate_penalty = _number("gate_penalty", gate_penalty)
        if self.gate_penalty < 0:
            raise UserError(f"model.params.gate_penalty must be >= 0, got {gate_penalty!r}")
        tokenizer = self.cond_stage_model.tokenizer
        self.placeholder, self.superclass = placeholder, superclass
        self.placeholder_id = single_token_id(tokenizer, placeholder)
        self.superclass_ids = superclass_token_ids(tokenizer, superclass)
        if self.placeholder_id in self.superclass_ids:
            raise UserError(f"placeholder {placeholder!r} is part of the superclass {superclass!r}")
        self.target_templates = _target_templates(target_templates)
        self.covariance_path, self.covariance_captions = covariance_path, repo_path(covariance_captions)
        if isinstance(covariance_max_captions, bool) or not isinstance(covariance_max_captions, int) \
                or covariance_max_captions < 1:
            raise UserError(f"model.params.covariance_max_captions must be a whole number >= 1, got "
                            f"{covariance_max_captions!r}")
        self.covariance_max_captions = covariance_max_captions
        self.beta, self.tau = _number("beta", beta), _number("tau", tau, positive=True)
        self.lr_o_v, self.lr_embedding = _number("lr_o_v", lr_o_v, positive=True), _number("lr_embedding", lr_embedding, positive=True)
        self.weight_decay = _number("weight_decay", weight_decay)
        if self.weight_decay < 0:
            raise UserError(f"model.params.weight_decay must be >= 0, got {weight_decay!r}")
        self.ema_decay = _number("ema_decay", ema_decay)
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"model.params.ema_decay must be in [0, 1), got {ema_decay!r}")
        if isinstance(validation_prompts, str) or not all(isinstance(p, str) for p in validation_prompts):
            raise UserError(f"model.params.validation_prompts must be a list of prompts (text), got {validation_prompts!r}")
        self.validation_prompts = [fill(p, placeholder) for p in validation_prompts]
        if isinstance(log_sample_steps, bool) or not isinstance(log_sample_steps, int) or log_sample_steps < 1:
            raise UserError(f"model.params.log_sample_steps must be a whole number >= 1, got {log_sample_steps!r}")
        self.log_sample_steps, self.log_guidance_scale = log_sample_steps, _number("log_guidance_scale", log_guidance_scale)

        self.model.requires_grad_(False)   # Perfusion trains only the embedding and o*_V
        # The embedding starts at the superclass word's (first batch, after the base weights are loaded).
        self.embedding = nn.Parameter(torch.zeros(self.cond_stage_model.token_embedding.embedding_dim))
        pairs = patch_cross_attention(self.model.diffusion_model)
        self.o_star_v = nn.ParameterList([nn.Parameter(torch.zeros(v.out_features), requires_grad=method != "embedding")
                                          for _, v in pairs])
        self.o_star_k = nn.ParameterList([nn.Parameter(torch.zeros(k.out_features)) for k, _ in pairs]
                                         if method == "trained_keys" else [])
        d_ctx = pairs[0][0].in_features
        self.register_buffer("i_star", torch.zeros(d_ctx))
        self.register_buffer("i_super", torch.zeros(d_ctx))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.bank = ConceptBank(pairs, C_inv=None)
        self._run: _FitState | None = None
        self._training_gates: GateSettings | None = None
        self.covariance_fingerprint: str | None = None

    # ----------------------------------------------------------------- bookkeeping
    @property
    def placeholder_rows(self) -> Mapping[int, torch.Tensor]:
        """Placeholder token id -> embedding of the active concepts (the bank's state owns them)."""
        return self.bank.state.rows

    def non_base_keys(self) -> list[str]:
        """Keys a base SD checkpoint does not carry (checkpoint loading must not report them)."""
        return [k for k in self.state_dict() if k in ("embedding", "i_star", "i_super", "initialized")
                or k.startswith(("o_star_v.", "o_star_k."))]

    def fingerprints(self) -> dict[str, str]:
        return {
            "unet": fingerprint_tensors(self.model.diffusion_model.state_dict()),
            "text_encoder": self.cond_stage_model.fingerprint(),
            "covariance": self.covariance_fingerprint or "",
        }

    # ----------------------------------------------------------------- covariance
    def ensure_covariance(self):
        """Load C^-1 (checking it belongs to this text encoder), or estimate it if no file is configured."""
        if self.bank.C_inv is not None:
            return
        from ldm.perfusion.covariance import estimate_covariance, estimate_fingerprint, invert

        encoder_fp = self.cond_stage_model.fingerprint()
        if self.covariance_path:
            C, C_inv, meta = load_covariance(self.covariance_path)
            made_for = meta.get("text_encoder_fingerprint")
            if made_for != encoder_fp:
                raise UserError(f"covariance file {self.covariance_path} was made for text encoder {made_for}, "
                                 f"but this model's text encoder is {encoder_fp}; "
                                 "run data/estimate_covariance.py with this config and checkpoint")
            self.covariance_fingerprint = fingerprint_tensors({"C": C})
        else:
            C = estimate_covariance(self.cond_stage_model, self.covariance_captions, self.covariance_max_captions)
            C_inv = invert(C)
            self.covariance_fingerprint = estimate_fingerprint(encoder_fp, self.covariance_captions,
                                                               self.covariance_max_captions)
        wide = torch.float32 if self.device.type == "mps" else torch.float64
        self.bank.C_inv = C_inv.to(self.device, wide)

    # ----------------------------------------------------------------- conditioning
    def get_learned_conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text encodings with the placeholder rows replaced by learned embeddings, laid out for the
        edited layers by `ConceptBank.pack` (with global key-locking the superclass prompt's encodings,
        aligned token by token, follow along the token axis)."""
        encoder = self.cond_stage_model
        if not self.placeholder_rows:
            for word in self.bank.state.unloaded:   # a prompt made for concepts that are gone
                named = [p for p in prompts if word_pattern(word).search(p)]
                if named:
                    raise UserError(f"prompt {named[0]!r} names {word!r}, a concept that was unloaded; "
                                    "load the concepts again")
            return super().get_learned_conditioning(prompts)
        check_prepared(prompts, self.bank.state)
        tokens = encoder.tokenize(list(prompts))
        encodings = encoder.encode_embeddings(tokens, self.embed_tokens(tokens, self.placeholder_rows))
        if not self.bank.active:   # textual inversion: plain projections
            return self.conditioning(encodings, prompts)
        e_super = None
        if self.bank.global_locking:
            super_tokens = encoder.tokenize([self.superclass_prompt(p) for p in prompts])
            supers = encoder.encode_embeddings(super_tokens, encoder.token_embedding(super_tokens))
            index = self.superclass_alignment(tokens.to(supers.device))
            e_super = supers.gather(1, index[..., None].expand(-1, -1, supers.shape[-1]))
        context = self.bank.pack(encodings, e_super, self.placeholder_positions(tokens, encodings.device))
        return self.conditioning(context, prompts)

    def conditioning(self, context: torch.Tensor, prompts: Sequence[str]):
        """What the U-Net receives for prompts naming concepts, given their (packed) context: the context
        itself here; SDXL adds its pooled vector."""
        return context

    def placeholder_positions(self, tokens: torch.Tensor, device) -> torch.Tensor | None:
        """(B, T, N) bool: where each active concept's placeholder sits, if the bank's rule needs it."""
        if not self.bank.needs_positions:
            return None
        ids = to_device(torch.tensor(list(self.concept_rows())), device)
        return tokens.to(device)[..., None] == ids

    def superclass_alignment(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index (B, T) into the superclass prompt's tokens of the same word as each concept-prompt token.

        A superclass of n sub-tokens ("teddy bear": 2) makes the superclass prompt n - 1 tokens longer
        from the placeholder on. The placeholder faces the superclass's last sub-token (which has seen
        the whole word, like i_super), every later token its own word; the earlier sub-tokens are
        dropped, and the end is padded with the superclass prompt's last position, as the encoder pads
        (words it lost to the length limit face its end token)."""
        tokenizer = self.cond_stage_model.tokenizer
        shift = torch.zeros_like(tokens)
        for token_id, (_, word) in self.bank.state.words.items():
            shift += (tokens == token_id) * (len(tokenizer.encode(word)) - 1)
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        return (steps + shift.cumsum(1)).clamp(max=tokens.shape[1] - 1)

    def concept_rows(self) -> dict[int, torch.Tensor]:
        """Placeholder token id -> embedding: the loaded concepts', else the one being trained."""
        return self.placeholder_rows or {self.placeholder_id: self.embedding}

    def embed_tokens(self, tokens: torch.Tensor, rows: dict[int, torch.Tensor]) -> torch.Tensor:
        """Token embeddings (B, T, width) with each placeholder id's row replaced by its learned vector."""
        embeds = self.cond_stage_model.token_embedding(tokens)
        for token_id, row in rows.items():
            embeds = torch.where((tokens == token_id)[..., None], row.to(embeds.dtype), embeds)
        return embeds

    def superclass_prompt(self, prompt: str) -> str:
        """The prompt with each concept's placeholder replaced by its superclass word (global key-locking)."""
        for placeholder, word in self.bank.state.words.values():
            prompt = word_pattern(placeholder).sub(lambda _: word, prompt)
        return prompt

    # ----------------------------------------------------------------- training
    def on_fit_start(self):
        self.ensure_covariance()
        self._fingerprints = self.fingerprints()
        self._run = _FitState()

    def on_fit_end(self):
        self._run = None

    def targets_initialized(self) -> bool:
        """Whether a first batch has set the embedding, i*, i_super and o*_V; while fitting, the device's
        flag is read once (a read is a host-device synchronisation), then known on the host."""
        run = self._run
        if run is None:
            return bool(self.initialized)
        run.initialized = run.initialized or bool(self.initialized)
        return run.initialized

    def _concept_positions(self, tokens: torch.Tensor, ids: Sequence[int], what: str, prompts) -> list[int]:
        """Index per row of the LAST token of `ids` (the superclass's last sub-token sees the whole word),
        read from the tokenizer's host tokens (no device memory)."""
        n = len(ids)
        windows = tokens.unfold(1, n, 1)                                    # (B, T - n + 1, n)
        hit = (windows == torch.tensor(ids)).all(-1)
        missing = [p for p, h in zip(prompts, hit.any(1).tolist()) if not h]
        if missing:
            raise UserError(f"{what} {self.cond_stage_model.tokenizer.decode(list(ids))!r} not found in prompt {missing[0]!r} "
                             "(every training template must contain '{}')")
        return (hit.int().argmax(1) + n - 1).tolist()

    @staticmethod
    def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x = x.clone()
            dist.all_reduce(x)
            x = x / dist.get_world_size()
        return x

    def encode_concept_prompts(self, tokens: torch.Tensor) -> torch.Tensor:
        """The concept prompts' encodings with the placeholder's embedding row (which the first batch
        initialises to the superclass word's, identically on every rank)."""
        encoder = self.cond_stage_model
        if not self.targets_initialized():
            with torch.no_grad():
                self.embedding.copy_(superclass_embedding(encoder, self.superclass_ids))
        return encoder.encode_embeddings(tokens, self.embed_tokens(tokens, {self.placeholder_id: self.embedding}))

    def template_targets(self, n: int, step: int) -> tuple[list[str], list[str]]:
        """(prompts, superclass prompts) of `n` target templates for optimizer step `step`, taken in
        turn, so that the EMA sees every template equally often (every rank the same ones)."""
        start = step * n
        chosen = [self.target_templates[(start + k) % len(self.target_templates)] for k in range(n)]
        return [fill(t, self.placeholder) for t in chosen], [fill(t, self.superclass) for t in chosen]

    def encodings_at(self, prompts: Sequence[str], ids: Sequence[int], what: str,
                     rows: dict[int, torch.Tensor] | None = None, encodings: torch.Tensor | None = None) -> torch.Tensor:
        """Encodings (B, d) at the last token of `ids` in each prompt (`rows`: learned embeddings to use).
        The encoders are causal, so only each batch's prefix up to that token is encoded (the same values
        as the whole prompt's there); `encodings` of the whole prompts are read instead when given."""
        tokens = self.cond_stage_model.tokenizer(list(prompts))           # on the host
        pos = self._concept_positions(tokens, ids, what, prompts)
        device = self.embedding.device
        if encodings is None:
            prefix = to_device(tokens[:, :max(pos) + 1], device)
            embeds = self.embed_tokens(prefix, rows) if rows else self.cond_stage_model.token_embedding(prefix)
            encodings = self.cond_stage_model.encode_embeddings(prefix, embeds)
        return encodings[torch.arange(len(prompts), device=device), to_device(torch.tensor(pos), device)]

    @torch.no_grad()
    def frozen_encodings(self, what: str, prompts: Sequence[str], encode) -> torch.Tensor:
        """`encode(prompts)` (B, ...), a function of the frozen text encoder alone: while fitting, each
        prompt's row is computed once and kept (a run's prompts are a few templates)."""
        cache = self._run.frozen if self._run is not None else {}
        new = list(dict.fromkeys(p for p in prompts if (what, p) not in cache))
        if new:
            cache.update(((what, p), row) for p, row in zip(new, encode(new)))
        return torch.stack([cache[what, p] for p in prompts])

    def superclass_targets(self, prompts: Sequence[str]) -> torch.Tensor:
        """Encodings (B, d) at the superclass word, in float32."""
        return self.frozen_encodings("i_super", prompts,
                                     lambda new: self.encodings_at(new, self.superclass_ids, "superclass").float())

    @torch.no_grad()
    def update_targets(self, captions: Sequence[str], captions_super: Sequence[str],
                       encodings: torch.Tensor | None = None):
        """EMA of i* and i_super from this batch (averaged over all ranks); the first batch initialises
        them and o*_V = W_V i_super, identically on every rank. `encodings`: the captions' whole encodings
        (`encode_concept_prompts`), when the caller has them already."""
        first = not self.targets_initialized()
        if first:
            self.embedding.copy_(superclass_embedding(self.cond_stage_model, self.superclass_ids))
        e_star = self.encodings_at(captions, [self.placeholder_id], "placeholder", {self.placeholder_id: self.embedding},
                                   None if encodings is None else encodings.detach())
        e_star = self._mean_over_ranks(e_star.float().mean(0))
        e_super = self._mean_over_ranks(self.superclass_targets(captions_super).mean(0))
        if first:
            self.i_star.copy_(e_star)
            self.i_super.copy_(e_super)
            for o_v, layer in zip(self.o_star_v, self.bank.values):
                o_v.copy_(layer.weight.float() @ e_super)        # o*_V starts at W_V i_super
            for o_k, layer in zip(self.o_star_k, self.bank.keys):
                o_k.copy_(layer.weight.float() @ e_super)        # trained keys start at the locked W_K i_super
            self.initialized.fill_(True)
            if self._run is not None:
                self._run.initialized = True
        else:
            d = self.ema_decay
            self.i_star.mul_(d).add_((1 - d) * e_star)
            self.i_super.mul_(d).add_((1 - d) * e_super)

    def training_state(self, beta=None, tau=None) -> ConceptState:
        """The concept being trained, as the bank applies it (its row, words, targets and gate rule)."""
        rows, words = {self.placeholder_id: self.embedding}, {self.placeholder_id: (self.placeholder, self.superclass)}
        if self.method == "embedding":   # textual inversion: the projections stay the base model's
            return ConceptState(rows=rows, words=words)
        o_key = [k[None] for k in self.o_star_k] if self.method == "trained_keys" else None
        if beta is not None or tau is not None:
            gates = GateSettings.of(self.beta if beta is None else beta, self.tau if tau is None else tau, 1, self.device)
        else:   # the training gates, built once per device (a tensor from Python numbers is a host-to-device copy)
            if self._training_gates is None or self._training_gates.beta.device != self.device:
                self._training_gates = GateSettings.of(self.beta, self.tau, 1, self.device)
            gates = self._training_gates
        targets = self.bank.targets(self.i_star[None], self.i_super[None], [v[None] for v in self.o_star_v], gates,
                                    o_key=o_key)
        return ConceptState(rows=rows, words=words, gate_at=self.gate_at, **targets)

    def activate_training_concept(self, beta=None, tau=None):
        self.bank.state = self.training_state(beta, tau)

    def shared_step(self, batch):
        self.ensure_covariance()
        captions = list(batch[self.cond_stage_key])
        tokens = self.cond_stage_model.tokenize(captions)
        cond = self.encode_concept_prompts(tokens)
        if self.target_templates is None:   # the targets' EMA over the images' captions reads cond detached
            self.update_targets(captions, batch["caption_super"], encodings=cond)
        else:
            self.update_targets(*self.template_targets(len(captions), self.global_step))
        self.activate_training_concept()
        leak = self.leaked_gate(cond, tokens) if self.gate_penalty and self.bank.active else None
        if self.bank.active:
            cond = self.bank.pack(cond, None, self.placeholder_positions(tokens, cond.device))
        cond = self.conditioning(cond, captions)
        z = self.training_latents(batch[self.first_stage_key], batch.get("key"))
        weight = self.latent_mask(batch.get("mask"), z.shape[-2:])
        loss = self.p_losses(z, cond, self.sample_timesteps(z.shape[0]), weight=weight)
        if self._run is None:
            self.check_finite(~torch.isfinite(loss))
        else:   # read once per optimizer step (on_before_optimizer_step), not here: a read waits for the device
            self._run.diverged |= ~torch.isfinite(loss.detach())
        if leak is not None:
            self.log("train/leaked_gate", leak.detach(), on_step=True, batch_size=len(captions))
            loss = loss + self.gate_penalty * leak
        return loss

    def check_finite(self, diverged: torch.Tensor | bool):
        if bool(diverged):
            raise DivergedError(f"the loss became NaN or infinite at step {self.global_step}; stopping before the "
                                "concept is updated (try a lower learning rate or fp32 precision)")

    def on_before_optimizer_step(self, optimizer):
        if self._run is not None:   # every micro-batch of the accumulated gradient is checked here, once
            self.check_finite(self._run.diverged)
            self._run.diverged = False

    def leaked_gate(self, encodings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean of Eq. 3's gate over the tokens other than the placeholder's, under the bank's active
        (training) state, differentiable in the encodings: `gate_penalty` times it joins the loss, so the
        embedding learns an encoding whose content the causal encoder does not hand on to the tokens after it."""
        bank = self.bank
        _, gate = concept_gates(encodings, bank.i_star, bank.C_inv, bank.gates.beta, bank.gates.tau)
        return gate[..., 0][tokens.to(encodings.device) != self.placeholder_id].mean()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        every = self.log_gates_every_n_steps
        if self.bank.active and every > 0 and self.global_step % every == 0:
            from ldm.perfusion.gates import gate_summary, gate_tables

            summary = gate_summary(gate_tables(self, self.validation_prompts))
            self.log_dict({f"gates/{k}": v for k, v in summary.items()}, on_step=True, batch_size=1)
        return loss

    def configure_optimizers(self):
        groups = [{"params": [self.embedding], "lr": self.lr_embedding, "name": "embedding"}]
        if self.method != "embedding":
            groups.append({"params": list(self.o_star_v.parameters()), "lr": self.lr_o_v, "name": "o_star_v"})
        if self.method == "trained_keys":
            groups.append({"params": list(self.o_star_k.parameters()), "lr": self.lr_o_v, "name": "o_star_k"})
        # AdamW's decay pulls the embedding and o*_V towards 0, not towards their superclass start: off by
        # default (torch's AdamW default, 0.01, is what the public implementation ran with)
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def on_train_end(self):
        self._assert_ranks_agree()

    def _assert_ranks_agree(self):
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        state = torch.cat([self.embedding.detach(), self.i_star, self.i_super] +
                          [v.detach() for v in [*self.o_star_v, *self.o_star_k]]).float()
        gathered = [torch.empty_like(state) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, state)
        if not all(torch.equal(gathered[0], g) for g in gathered):
            raise RuntimeError("Perfusion concept differs between DDP ranks; this is a bug")

    # ----------------------------------------------------------------- concept files
    def concept(self) -> Concept:
        if not bool(self.initialized):
            raise ConceptError("the concept is not initialised yet (no training batch seen)")
        return Concept(
            embedding=self.embedding, i_star=self.i_star, i_super=self.i_super, o_star_v=list(self.o_star_v),
            placeholder=self.placeholder, superclass=self.superclass, train_beta=self.beta, train_tau=self.tau,
            fingerprints=getattr(self, "_fingerprints", None) or self.fingerprints(),
            method=self.method, o_star_k=list(self.o_star_k) or None,
        )

    def save_concept(self, path: str | Path) -> Path:
        return save_concept(path, self.concept())

    # ----------------------------------------------------------------- logging
    @torch.no_grad()
    def log_images(self, batch, max_images: int = 4, sample=None) -> dict[str, torch.Tensor]:
        """The batch's images (masked where masks are given) and, once the targets are set and with `sample`
        (ldm.sample.generate, passed by the image logger), the validation prompts and where the concept
        token attends."""
        images = (batch[self.first_stage_key][:max_images].float() + 1) / 2
        out = {"inputs": images}
        if batch.get("mask") is not None:
            mask = batch["mask"][:max_images].float()
            out["inputs_masked"] = images * (0.25 + 0.75 * mask)
        if sample is None or not bool(self.initialized):
            return out
        self.ensure_covariance()
        with self.bank.use(self.training_state()):
            side = self.image_size * self.first_stage_model.downsample_factor
            out["samples"] = sample(self, self.validation_prompts, steps=self.log_sample_steps,
                                    scale=self.log_guidance_scale, height=side, width=side, seed=0)
            out["concept_attention"] = self.attention_picture(self.validation_prompts[0], side)
        return out

    @torch.no_grad()
    def attention_picture(self, prompt: str, side: int, t: int = 500) -> torch.Tensor:
        """Where the placeholder token attends: cross-attention probabilities at its position,
        averaged over heads and layers (upsampled to the image), for one noisy latent at timestep t."""
        tokens = self.cond_stage_model.tokenizer([prompt])
        pos = self._concept_positions(tokens, [self.placeholder_id], "placeholder", [prompt])[0]
        maps = []
        for probs in self.cross_attention_probs(prompt, t):
            h = w = int(round(probs.shape[1] ** 0.5))
            m = probs[:, :, pos].mean(0).reshape(1, 1, h, w)
            maps.append(F.interpolate(m.float(), size=(side, side), mode="bilinear", align_corners=False))
        heat = torch.stack(maps).mean(0)
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
        return torch.cat([heat, heat ** 2, 1 - heat], dim=1).cpu()   # warm = attended


def _target_templates(value) -> list[str] | None:
    """model.params.target_templates: a list of templates with '{}', a text file of them (one per line),
    "captions" (the images' own captions: None) or null (TEMPLATES)."""
    if value == "captions":
        return None
    if value is None:
        return list(TEMPLATES)
    if isinstance(value, str) and "{}" in value:
        raise UserError(f"model.params.target_templates: {value!r} is one template; give a list ([{value!r}]) "
                        "or a text file of templates")
    if isinstance(value, str):
        path = repo_path(value)
        try:
            value = [line.strip() for line in Path(path).read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"model.params.target_templates: cannot read {path} ({err.__class__.__name__}: {err})") from err
        value = [line for line in value if line and not line.startswith("#")]
    if not isinstance(value, Sequence) or not value or not all(isinstance(t, str) and t.count("{}") == 1 for t in value):
        raise UserError("model.params.target_templates must be a non-empty list of templates with one '{}' each, "
                        f"a text file of them, or \"captions\"; got {value!r}")
    return list(value)


def superclass_embedding(encoder, ids: Sequence[int]) -> torch.Tensor:
    """Where the placeholder's embedding starts: the mean of the superclass's token embeddings (float32)."""
    return encoder.token_embedding(torch.tensor(list(ids), device=next(encoder.parameters()).device)).float().mean(0)
