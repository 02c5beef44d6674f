"""A batched causal-LM runner with one KV cache per session (a device's SLM context, or a device's
context on the verifier's LLM).

One ``extend`` call appends new tokens to many sessions at once, in ONE forward, whatever their past
lengths and however many new tokens each brings (the verifier gets 1 draft + any piggybacked skipped
tokens per device; a device group gets 1 token per device, or a whole prompt at the start).

How one forward is laid out (P = longest past, N = most new tokens in the call, B sessions):

    row i:  [ zeros (P - p_i) | past_i (p_i) | new_i (n_i) | pad (N - n_i) ]     KV slots 0 .. P+N-1

- the past of every session is copied, left-padded, into one preallocated [layers, B, kv_heads, P+N,
  head_dim] slab; the model writes the new keys/values into slots P.. of the same slab (a small Cache
  layer, ``_SlabLayer``, instead of DynamicCache's torch.cat), so each step copies the past once;
- the 2D attention mask marks the valid slots, transformers builds the causal mask from it and
  ``cache_position = P .. P+N-1`` (slot order is causal order for every row);
- ``position_ids`` are explicit per row, p_i .. p_i+n_i-1, so rotary positions are each session's own;
  the cached keys already carry their rotary rotation, so where they sit in the slab does not matter;
- new keys/values of the valid slots are appended to each session's own growable buffer; pad slots
  are dropped. The lm head runs only on the positions asked for (not on pads).

``vocab_size`` is the logits dimension, i.e. the lm head's rows (``config.vocab_size``): 151936 for
Qwen2.5, the |V| of DESIGN.md. It can exceed the number of real tokens (Qwen's tokenizer defines 151665;
the GGUF tokenizer pads its table to 151936 with placeholder tokens); the extra ids are part of the
distribution and simply get negligible probability. Logits come back as float32 numpy arrays (from a
bf16 model they carry bf16 rounding of the lm head output).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

SessionId = Hashable


class LMError(ValueError):
    """Bad input to BatchedLM (unknown token ids, empty token lists, too long contexts, ...)."""


class _SlabLayer(DynamicLayer):
    """One layer's KV for one batched forward: the past is already in ``keys[..., :past, :]``; the
    forward's new keys/values are written in place after it (no concatenation)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: int):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.seen = past

    def lazy_initialization(self, key_states: torch.Tensor) -> None:  # already initialised
        pass

    def update(self, key_states, value_states, cache_kwargs=None):
        n = key_states.shape[-2]
        self.keys[:, :, self.seen : self.seen + n] = key_states
        self.values[:, :, self.seen : self.seen + n] = value_states
        self.seen += n
        return self.keys[:, :, : self.seen], self.values[:, :, : self.seen]

    def get_seq_length(self) -> int:
        return self.seen


@dataclass
class _Session:
    keys: torch.Tensor  # [layers, kv_heads, capacity, head_dim]; valid slots :length
    values: torch.Tensor
    length: int = 0


class BatchedLM:
    """Per-session KV caches over one transformers causal LM (decoder + lm head, Llama/Qwen family).

    Not thread-safe: one owner (an actor) calls it. All work runs under torch.inference_mode().
    """

    def __init__(self, model, min_capacity: int = 64):
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        config = model.config
        self.vocab_size: int = int(self.lm_head.weight.shape[0])
        self.n_layers: int = int(config.num_hidden_layers)
        self.kv_heads: int = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim: int = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.max_positions: int = int(config.max_position_embeddings)
        self.dtype = self.lm_head.weight.dtype
        self.device = self.lm_head.weight.device
        self.min_capacity = min_capacity
        self._sessions: dict[SessionId, _Session] = {}
        # The per-call KV slab is reused between calls (grow-only): allocating ~100 MB afresh every
        # step costs page faults on first touch.
        self._work_k = torch.empty(0, dtype=self.dtype, device=self.device)
        self._work_v = torch.empty(0, dtype=self.dtype, device=self.device)

    # -- sessions ---------------------------------------------------------------------------------

    def sessions(self) -> list[SessionId]:
        return list(self._sessions)

    def length(self, session_id: SessionId) -> int:
        """Tokens in the session's cache (0 for a session not yet created)."""
        s = self._sessions.get(session_id)
        return s.length if s else 0

    def drop(self, session_id: SessionId) -> bool:
        """Forget a session and free its cache. True if it existed."""
        return self._sessions.pop(session_id, None) is not None

    def kv_bytes(self) -> int:
        """Bytes held by all session caches (capacity, not just used slots)."""
        return sum(2 * s.keys.numel() * s.keys.element_size() for s in self._sessions.values())

    def workspace_bytes(self) -> int:
        """Bytes held by the reusable per-call KV slab (sized by the largest call so far)."""
        return 2 * self._work_k.numel() * self._work_k.element_size()

    def release_workspace(self) -> None:
        """Free the per-call slab (e.g. after a large prefill); the next call allocates what it needs."""
        self._work_k = self._work_k.new_empty(0)
        self._work_v = self._work_v.new_empty(0)

    def _workspace(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        numel = int(np.prod(shape))
        if self._work_k.numel() < numel:
            grown = int(numel * 1.25)  # headroom: the past grows by a token or so per step
            self._work_k = torch.empty(grown, dtype=self.dtype, device=self.device)
            self._work_v = torch.empty(grown, dtype=self.dtype, device=self.device)
        return self._work_k[:numel].view(shape), self._work_v[:numel].view(shape)

    def _reserve(self, session_id: SessionId, needed: int) -> _Session:
        s = self._sessions.get(session_id)
        capacity = 0 if s is None else s.keys.shape[2]
        if needed <= capacity:
            return s
        new_cap = max(needed, int(capacity * 1.5), self.min_capacity)  # amortised growth
        shape = (self.n_layers, self.kv_heads, new_cap, self.head_dim)
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        values = torch.empty(shape, dtype=self.dtype, device=self.device)
        if s is None:
            s = self._sessions[session_id] = _Session(keys, values)
        else:
            keys[:, :, : s.length] = s.keys[:, :, : s.length]
            values[:, :, : s.length] = s.values[:, :, : s.length]
            s.keys, s.values = keys, values
        return s

    # -- the batched forward ----------------------------------------------------------------------

    def _validate(self, items) -> tuple[list[SessionId], list[list[int]]]:
        ids, tokens = [], []
        for item in items:
            try:
                sid, toks = item
            except (TypeError, ValueError):
                raise LMError(f"each item must be (session_id, token_ids), got {item!r}") from None
            toks = [int(t) for t in toks]
            if not toks:
                raise LMError(f"session {sid!r}: no new tokens")
            bad = [t for t in toks if not 0 <= t < self.vocab_size]
            if bad:
                raise LMError(f"session {sid!r}: token ids {bad[:5]} outside [0, {self.vocab_size})")
            ids.append(sid)
            tokens.append(toks)
        if len(set(ids)) != len(ids):
            raise LMError(f"a session appears more than once in one extend call: {ids}")
        for sid, toks in zip(ids, tokens):
            if self.length(sid) + len(toks) > self.max_positions:
                raise LMError(
                    f"session {sid!r}: {self.length(sid)} + {len(toks)} tokens exceed the model's "
                    f"{self.max_positions} positions"
                )
        return ids, tokens

    @torch.inference_mode()
    def extend(
        self, items: Sequence[tuple[SessionId, Sequence[int]]], all_positions: bool = False
    ) -> list[np.ndarray]:
        """Append tokens to each session's cache (created on first use) in one forward.

        Returns, per item, float32 logits of the last new position ([vocab_size]), or with
        all_positions of every new position ([n_i, vocab_size]; row j predicts the token after new
        token j). Nothing is appended if the call raises.
        """
        ids, tokens = self._validate(items)
        if not ids:
            return []
        batch = len(ids)
        past = np.array([self.length(sid) for sid in ids])
        new = np.array([len(t) for t in tokens])
        P, N = int(past.max()), int(new.max())

        input_ids = np.zeros((batch, N), dtype=np.int64)  # pad slots hold token 0; outputs dropped
        for i, toks in enumerate(tokens):
            input_ids[i, : len(toks)] = toks
        slots = np.arange(P + N)
        attention_mask = (slots >= P - past[:, None]) & (slots < P + new[:, None])
        position_ids = past[:, None] + np.arange(N)  # each session's own positions p_i, p_i + 1, ...
        slab_shape = (self.n_layers, batch, self.kv_heads, P + N, self.head_dim)
        slab_k, slab_v = self._workspace(slab_shape)
        for i, (sid, p) in enumerate(zip(ids, past.tolist())):
            if p < P:  # masked slots must hold finite values: weight 0 times NaN garbage is still NaN
                slab_k[:, i, :, : P - p] = 0
                slab_v[:, i, :, : P - p] = 0
            if p:
                s = self._sessions[sid]
                slab_k[:, i, :, P - p : P] = s.keys[:, :, :p]
                slab_v[:, i, :, P - p : P] = s.values[:, :, :p]
        cache = Cache(layers=[_SlabLayer(slab_k[layer], slab_v[layer], P) for layer in range(self.n_layers)])
        out = self.decoder(
            input_ids=torch.from_numpy(input_ids).to(self.device),
            attention_mask=torch.from_numpy(attention_mask).to(self.device),
            position_ids=torch.from_numpy(position_ids).to(self.device),
            cache_position=torch.arange(P, P + N, device=self.device),
            past_key_values=cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state  # [B, N, H]

        if all_positions:
            keep = torch.from_numpy(np.arange(N) < new[:, None]).to(self.device)
            logits = self.lm_head(hidden[keep]).float().cpu().numpy()  # [sum n_i, V], row-major = session order
            result = np.split(logits, np.cumsum(new)[:-1])
        else:
            last = torch.from_numpy(new - 1).to(self.device)
            logits = self.lm_head(hidden[torch.arange(batch, device=self.device), last]).float().cpu().numpy()
            result = list(logits)

        # Commit only after the forward succeeded.
        for i, (sid, p, n) in enumerate(zip(ids, past.tolist(), new.tolist())):
            s = self._reserve(sid, p + n)
            s.keys[:, :, p : p + n] = slab_k[:, i, :, P : P + n]
            s.values[:, :, p : p + n] = slab_v[:, i, :, P : P + n]
            s.length = p + n
        return result
