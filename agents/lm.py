"""A batched causal-LM runner with one KV cache per session (a device's SLM context, or a device's
context on the verifier's LLM), whose result for one session never depends on its companions.

One ``extend`` call appends new tokens to many sessions at once, whatever their past lengths and
however many new tokens each brings (the verifier gets 1 draft + any piggybacked skipped tokens per
device; a device group gets 1 token per device, or whole prompts at the start).

Batch invariance (the logits of a session are bit-identical alone or in any batch) is what lets the
testbed batch forwards and still give the same trace in every layout, under any loss and timing
(docs/design.md section 2). Float rounding depends on how an op is laid out, so the forward is laid out
so that nothing a session computes depends on the other rows (the "packed" forward, Llama/Qwen2
family; ``forward="packed"``):

- the new tokens of all sessions are packed into one [T, hidden] matrix (no padding to the longest
  call, no copying of pasts into a shared slab);
- matmuls over those rows (q/k/v/o, MLP, lm head) run as fixed tiles of ``ROW_TILE`` rows,
  zero-padded, so every GEMM call has the same shape (``matmul="tiled"``). One call over all rows
  (``matmul="plain"``) is not invariant: GEMM libraries pick kernels by row count (MKL's fp32 sgemm
  changes its reduction order below 4 rows; oneDNN's bf16 GEMV at 1 row rounds differently from
  its GEMM), measured per op by ``testbed bench invariance``;
- RMSNorm always runs on fixed row tiles (a reduction's threading may depend on the row count);
- attention runs per session, on that session's own cache (keys 0 .. past + n), so its softmax and
  its reductions see only that session's slots; new keys/values are written straight into the
  session's cache (the session's length moves only after the whole forward succeeded).

Every other op is elementwise. ``tests/agents/test_lm_invariance.py`` checks the bits on tiny models
and, where prepared, on the real Qwen pair (prefill and decode, batches of 2..32 with random
companions). Architectures outside the family use the transformers forward (``forward="hf"``, a
left-padded slab): close to, but not bit-equal between, batch layouts.

Prompt prefix cache (``PrefixCache``): with the packed forward a prompt's keys, values and
last-position logits are a function of the model and the prompt alone, so a prefill is computed
once per distinct prompt and copied for every other session that starts with the same tokens, in
the same call (a fleet whose devices share prompts) or in a later one (every point of `testbed
reproduce` prefills the same HumanEval prompts). The copy is the computed bits, so nothing
changes but the time. One cache per model object, per process, bounded in bytes
(``HLM_PREFIX_CACHE_MB``, default 512; 0 turns it off).

``vocab_size`` is the logits dimension, i.e. the lm head's rows (``config.vocab_size``): 151936 for
Qwen2.5, the |V| of docs/design.md. Logits come back as float32 numpy arrays.
"""

from __future__ import annotations

import collections
import contextlib
import os
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

SessionId = Hashable

ROW_TILE = 16  # rows per GEMM call in the tiled layout (and per RMSNorm call)
PACKED_TYPES = ("qwen2", "llama", "mistral")  # decoder layout handled by the packed forward
MAX_GEMM_ROWS = 512  # plain layout: rows per GEMM call


class LMError(ValueError):
    """Bad input to BatchedLM (unknown token ids, empty token lists, too long contexts, ...)."""


@dataclass
class _Session:
    keys: torch.Tensor  # [layers, kv_heads, capacity, head_dim]; valid slots :length
    values: torch.Tensor
    length: int = 0


def _tiles(n: int, size: int):
    return ((i, min(i + size, n)) for i in range(0, n, size))


def _pad_rows(x: torch.Tensor, tile: int) -> torch.Tensor:
    """x with zero rows appended up to a multiple of `tile` rows."""
    pad = -x.shape[0] % tile
    return torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    """x @ weight.T + bias as calls of exactly `tile` rows each (the last one zero-padded), so a
    row's bits do not depend on how many rows came with it."""
    xp = _pad_rows(x, tile)
    out = xp.new_empty(xp.shape[0], weight.shape[0])
    for a, b in _tiles(xp.shape[0], tile):
        out[a:b] = F.linear(xp[a:b], weight, bias)
    return out[: x.shape[0]]


def chunked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One GEMM call per MAX_GEMM_ROWS rows (bounds the temporary of a long prefill)."""
    if x.shape[0] <= MAX_GEMM_ROWS:
        return F.linear(x, weight, bias)
    return torch.cat([F.linear(x[a:b], weight, bias) for a, b in _tiles(x.shape[0], MAX_GEMM_ROWS)])


@dataclass
class _Prefix:
    keys: torch.Tensor  # [layers, kv_heads, n, head_dim], the prompt's slots
    values: torch.Tensor
    logits: np.ndarray | None  # last-position logits (None: the prefill that made it skipped the lm head)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size() + (0 if self.logits is None else self.logits.nbytes)


class PrefixCache:
    """(torch threads, *prompt token ids) -> their prefill (keys, values, last logits), least recently used first out
    past `max_bytes`. Only for a batch-invariant forward, where the bits do not depend on the call."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.entries: collections.OrderedDict[tuple[int, ...], _Prefix] = collections.OrderedDict()

    def get(self, prompt: tuple[int, ...], want_logits: bool) -> _Prefix | None:
        entry = self.entries.get(prompt)
        if entry is None or (want_logits and entry.logits is None):
            return None
        self.entries.move_to_end(prompt)
        self.hits += 1
        return entry

    def put(self, prompt: tuple[int, ...], entry: _Prefix) -> None:
        if entry.nbytes > self.max_bytes:
            return
        old = self.entries.pop(prompt, None)
        self.bytes += entry.nbytes - (old.nbytes if old else 0)
        self.entries[prompt] = entry
        while self.bytes > self.max_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= dropped.nbytes


class ComputeTurn:
    """One machine's cores, taken in turns by several processes (an exclusive flock on `path`, held
    for one forward). In the virtual clock's content pass every actor computes on all the cores
    (actors.threads); when several of them have a forward ready at once (several device groups), they
    take turns instead of splitting the cores, where each OpenMP region would wait for time slices.
    Timing only: the bits do not depend on the order. The kernel drops the lock of a killed process."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self.waits = 0  # forwards that found the cores taken

    def __enter__(self) -> ComputeTurn:
        import fcntl

        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.waits += 1
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)


_PREFIX_CACHES: weakref.WeakKeyDictionary[torch.nn.Module, PrefixCache] = weakref.WeakKeyDictionary()


def prefix_cache(model) -> PrefixCache | None:
    """The process's prefix cache of `model` (shared by every BatchedLM over it); None when off."""
    max_bytes = int(float(os.environ.get("HLM_PREFIX_CACHE_MB", "512")) * 2**20)
    if max_bytes <= 0:
        return None
    cache = _PREFIX_CACHES.get(model)
    if cache is None:
        cache = _PREFIX_CACHES[model] = PrefixCache(max_bytes)
    return cache


class BatchedLM:
    """Per-session KV caches over one transformers causal LM (decoder + lm head, Llama/Qwen family).

    forward: "auto" (packed where the architecture allows, else hf) | "packed" | "hf".
    matmul: "tiled" (batch invariant) | "plain" (one GEMM call per 512 rows; not invariant).
    Not thread-safe: one owner (an actor) calls it. All work runs under torch.inference_mode().
    """

    def __init__(self, model, min_capacity: int = 64, forward: str = "auto", matmul: str = "tiled"):
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        config = model.config
        self.config = config
        self.vocab_size: int = int(self.lm_head.weight.shape[0])
        self.n_layers: int = int(config.num_hidden_layers)
        self.n_heads: int = int(config.num_attention_heads)
        self.kv_heads: int = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim: int = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.max_positions: int = int(config.max_position_embeddings)
        self.dtype = self.lm_head.weight.dtype
        self.device = self.lm_head.weight.device
        self.kv_dtype = self.dtype  # set again below for the packed forward
        self.min_capacity = min_capacity
        self._sessions: dict[SessionId, _Session] = {}
        if forward not in ("auto", "packed", "hf") or matmul not in ("plain", "tiled"):
            raise LMError(f"forward must be auto|packed|hf and matmul plain|tiled, got {forward!r}, {matmul!r}")
        packable = self._packable()
        if forward == "packed" and not packable:
            raise LMError(
                f"the packed forward does not support model_type {config.model_type!r} "
                f"(supported: {', '.join(PACKED_TYPES)}, default rotary, no sliding window)"
            )
        self.forward = "packed" if forward == "packed" or (forward == "auto" and packable) else "hf"
        if self.forward == "packed" and self.device.type == "cpu":
            # Attention in fp32 on CPU: its bf16 kernels run 5-8x slower than fp32 at decode shapes
            # (measured: 114 vs 24 us per head group at 100 keys), and a bf16 key is exact in fp32.
            self.kv_dtype = torch.float32
        self.matmul = matmul
        self.prefixes = prefix_cache(model) if self.batch_invariant else None  # bits must not depend on the call
        self.prefix_tokens_served = 0  # prompt tokens copied from the prefix cache instead of computed
        # Held around every forward: a ComputeTurn where several processes share the cores in turns.
        self.turn: contextlib.AbstractContextManager = contextlib.nullcontext()
        # hf forward: the per-call KV slab is reused between calls (grow-only).
        self._work_k = torch.empty(0, dtype=self.dtype, device=self.device)
        self._work_v = torch.empty(0, dtype=self.dtype, device=self.device)

    def _packable(self) -> bool:
        """Llama/Qwen2 decoder layout, full attention, position-wise rotary (no dynamic rope, whose
        frequencies depend on the longest position in the batch)."""
        c = self.config
        rope = (getattr(c, "rope_scaling", None) or {}).get("rope_type", "default")
        windowed = getattr(c, "use_sliding_window", True) and getattr(c, "sliding_window", None)
        return (
            getattr(c, "model_type", None) in PACKED_TYPES
            and hasattr(self.decoder, "layers")
            and not windowed
            and rope not in ("dynamic", "longrope")
        )

    @property
    def batch_invariant(self) -> bool:
        """A session's logits are the same bits alone or in any batch (the packed forward, tiled GEMMs).
        Callers batch sessions only then (agents.content.batch_invariant)."""
        return self.forward == "packed" and self.matmul == "tiled"

    def describe(self) -> dict:
        """How this runner computes (recorded with every run)."""
        return {
            "forward": self.forward,
            "matmul": self.matmul,
            "row_tile": ROW_TILE if self.matmul == "tiled" else None,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "compute_turn": None if not isinstance(self.turn, ComputeTurn) else {"waits": self.turn.waits},
            "batch_invariant": self.batch_invariant,
            "prefix_cache": None
            if self.prefixes is None
            else {"max_mib": round(self.prefixes.max_bytes / 2**20, 1), "tokens_served": self.prefix_tokens_served},
        }

    @contextlib.contextmanager
    def uncached(self):
        """No prefix cache inside: for yardsticks that time a prefill (a cached one costs a copy)."""
        saved, self.prefixes = self.prefixes, None
        try:
            yield self
        finally:
            self.prefixes = saved

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
        """Bytes held by the hf forward's reusable per-call KV slab."""
        return 2 * self._work_k.numel() * self._work_k.element_size()

    def release_workspace(self) -> None:
        """Free the hf forward's per-call slab; the next call allocates what it needs."""
        self._work_k = self._work_k.new_empty(0)
        self._work_v = self._work_v.new_empty(0)

    def _reserve(self, session_id: SessionId, needed: int) -> _Session:
        """The session with room for `needed` slots (created or grown; its length unchanged)."""
        s = self._sessions.get(session_id)
        capacity = 0 if s is None else s.keys.shape[2]
        if needed <= capacity:
            return s
        new_cap = max(needed, int(capacity * 1.5), self.min_capacity)  # amortised growth
        shape = (self.n_layers, self.kv_heads, new_cap, self.head_dim)
        keys = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
        values = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
        if s is None:
            s = self._sessions[session_id] = _Session(keys, values)
        else:
            keys[:, :, : s.length] = s.keys[:, :, : s.length]
            values[:, :, : s.length] = s.values[:, :, : s.length]
            s.keys, s.values = keys, values
        return s

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
        self, items: Sequence[tuple[SessionId, Sequence[int]]], all_positions: bool = False, logits: bool = True
    ) -> list[np.ndarray]:
        """Append tokens to each session's cache (created on first use) in one forward.

        Returns, per item, float32 logits of the last new position ([vocab_size]), or with
        all_positions of every new position ([n_i, vocab_size]; row j predicts the token after new
        token j); with logits=False nothing (a prefill whose logits nobody reads skips the lm head).
        Nothing is appended if the call raises.
        """
        ids, tokens = self._validate(items)
        if not ids:
            return []
        with self.turn:
            if self.forward == "packed":
                return self._extend_packed(ids, tokens, all_positions, logits)
            return self._extend_hf(ids, tokens, all_positions, logits)

    # -- the packed, batch-invariant forward -------------------------------------------------------

    def _linear(self, x: torch.Tensor, module) -> torch.Tensor:
        if self.matmul == "tiled":
            return tiled_linear(x, module.weight, module.bias, ROW_TILE)
        return chunked_linear(x, module.weight, module.bias)

    @staticmethod
    def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
        """The model's RMSNorm module, one fixed tile of rows per call."""
        xp = _pad_rows(x, ROW_TILE)
        return torch.cat([norm(xp[a:b]) for a, b in _tiles(xp.shape[0], ROW_TILE)])[: x.shape[0]]

    def _extend_packed(self, ids, tokens, all_positions: bool, want_logits: bool) -> list[np.ndarray]:
        """The packed forward, each distinct prompt prefilled once (module docstring, PrefixCache):
        a new session whose prompt is cached, or is computed by another item of this call, gets a
        copy of those bits instead of its own rows in the forward."""
        cache = None if all_positions else self.prefixes
        if cache is None:
            return self._forward_packed(ids, tokens, all_positions, want_logits)
        source: list = [None] * len(ids)  # None: computed here; a _Prefix: cached; an int: item computing it
        computing: dict[tuple[int, ...], int] = {}
        for i, (sid, toks) in enumerate(zip(ids, tokens)):
            if self.length(sid):
                continue
            prompt = (torch.get_num_threads(), *toks)  # GEMM rounding may depend on the thread count
            source[i] = cache.get(prompt, want_logits)
            if source[i] is None and prompt in computing:
                source[i] = computing[prompt]
            elif source[i] is None:
                computing[prompt] = i
        run = [i for i, s in enumerate(source) if s is None]
        out = self._forward_packed([ids[i] for i in run], [tokens[i] for i in run], False, want_logits) if run else []
        logits = dict(zip(run, out)) if want_logits else {}
        for prompt, i in computing.items():
            s, n = self._sessions[ids[i]], len(tokens[i])
            cache.put(
                prompt,
                _Prefix(
                    s.keys[:, :, :n].clone(), s.values[:, :, :n].clone(), logits[i].copy() if want_logits else None
                ),
            )
        for i, src in enumerate(source):
            if src is None:
                continue
            if isinstance(src, int):
                s = self._sessions[ids[src]]
                n = len(tokens[i])
                src = _Prefix(s.keys[:, :, :n], s.values[:, :, :n], logits.get(src))
            n = src.keys.shape[2]
            self.prefix_tokens_served += n
            s = self._reserve(ids[i], n)
            s.keys[:, :, :n] = src.keys
            s.values[:, :, :n] = src.values
            s.length = n
            if want_logits:
                logits[i] = src.logits.copy()
        return [logits[i] for i in range(len(ids))] if want_logits else []

    def _forward_packed(self, ids, tokens, all_positions: bool, want_logits: bool) -> list[np.ndarray]:
        past = [self.length(sid) for sid in ids]
        new = [len(t) for t in tokens]
        sessions = [self._reserve(sid, p + n) for sid, p, n in zip(ids, past, new)]
        flat = torch.tensor([t for toks in tokens for t in toks], dtype=torch.long, device=self.device)
        positions = torch.tensor([p + j for p, n in zip(past, new) for j in range(n)], device=self.device)
        starts = np.concatenate([[0], np.cumsum(new)]).tolist()
        H, KVH, D = self.n_heads, self.kv_heads, self.head_dim
        x = self.decoder.embed_tokens(flat)  # [T, hidden]
        cos, sin = self.decoder.rotary_emb(x[None], positions[None])  # [1, T, D], per position only
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [T, 1, D]
        for li, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            h = self._rms_norm(x, layer.input_layernorm)
            q = self._linear(h, attn.q_proj).view(-1, H, D)
            k = self._linear(h, attn.k_proj).view(-1, KVH, D)
            v = self._linear(h, attn.v_proj).view(-1, KVH, D)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = torch.empty_like(q)
            for i, s in enumerate(sessions):
                a, b, p, n = starts[i], starts[i + 1], past[i], new[i]
                s.keys[li, :, p : p + n] = k[a:b].transpose(0, 1)
                s.values[li, :, p : p + n] = v[a:b].transpose(0, 1)
                out[a:b] = _attend(
                    q[a:b].to(self.kv_dtype), s.keys[li, :, : p + n], s.values[li, :, : p + n], p, attn.scaling
                )
            x = x + self._linear(out.view(-1, H * D), attn.o_proj)
            h = self._rms_norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            x = x + self._linear(
                mlp.act_fn(self._linear(h, mlp.gate_proj)) * self._linear(h, mlp.up_proj), mlp.down_proj
            )
        result: list[np.ndarray] = []
        if want_logits:
            rows = list(range(len(flat))) if all_positions else [e - 1 for e in starts[1:]]
            hidden = self._rms_norm(x[rows], self.decoder.norm)
            z = self._linear(hidden, self.lm_head).float().cpu().numpy()
            result = np.split(z, starts[1:-1]) if all_positions else list(z)
        for s, p, n in zip(sessions, past, new):  # commit only after the forward succeeded
            s.length = p + n
        return result

    # -- the transformers forward (other architectures) --------------------------------------------

    def _workspace(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        numel = int(np.prod(shape))
        if self._work_k.numel() < numel:
            grown = int(numel * 1.25)  # headroom: the past grows by a token or so per step
            self._work_k = torch.empty(grown, dtype=self.dtype, device=self.device)
            self._work_v = torch.empty(grown, dtype=self.dtype, device=self.device)
        return self._work_k[:numel].view(shape), self._work_v[:numel].view(shape)

    def _extend_hf(self, ids, tokens, all_positions: bool, want_logits: bool) -> list[np.ndarray]:
        """row i: [ zeros (P - p_i) | past_i | new_i | pad (N - n_i) ] in one left-padded KV slab;
        transformers builds the causal mask from the 2D mask, positions are each session's own."""
        batch = len(ids)
        past = np.array([self.length(sid) for sid in ids])
        new = np.array([len(t) for t in tokens])
        P, N = int(past.max()), int(new.max())
        input_ids = np.zeros((batch, N), dtype=np.int64)  # pad slots hold token 0; outputs dropped
        for i, toks in enumerate(tokens):
            input_ids[i, : len(toks)] = toks
        slots = np.arange(P + N)
        attention_mask = (slots >= P - past[:, None]) & (slots < P + new[:, None])
        position_ids = past[:, None] + np.arange(N)
        slab_k, slab_v = self._workspace((self.n_layers, batch, self.kv_heads, P + N, self.head_dim))
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
        result: list[np.ndarray] = []
        if want_logits and all_positions:
            keep = torch.from_numpy(np.arange(N) < new[:, None]).to(self.device)
            z = self.lm_head(hidden[keep]).float().cpu().numpy()  # [sum n_i, V], row-major = session order
            result = np.split(z, np.cumsum(new)[:-1])
        elif want_logits:
            last = torch.from_numpy(new - 1).to(self.device)
            result = list(self.lm_head(hidden[torch.arange(batch, device=self.device), last]).float().cpu().numpy())
        for i, (sid, p, n) in enumerate(zip(ids, past.tolist(), new.tolist())):  # commit after success
            s = self._reserve(sid, p + n)
            s.keys[:, :, p : p + n] = slab_k[:, i, :, P : P + n]
            s.values[:, :, p : p + n] = slab_v[:, i, :, P : P + n]
            s.length = p + n
        return result


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float) -> torch.Tensor:
    """One session's attention: q [n, H, D] over its own keys/values [KVH, past + n, D]; new token j
    sees keys 0 .. past + j. Returns [n, H, D]."""
    n = q.shape[0]
    qh = q.transpose(0, 1)[None]  # [1, H, n, D]
    kwargs = {}
    if n > 1 and past == 0:
        kwargs["is_causal"] = True
    elif n > 1:
        keys = torch.arange(past + n, device=q.device)
        kwargs["attn_mask"] = keys[None, :] <= (past + torch.arange(n, device=q.device))[:, None]
    o = F.scaled_dot_product_attention(qh, k[None], v[None], scale=scale, enable_gqa=True, **kwargs)
    return o[0].transpose(0, 1)


class _SlabLayer(DynamicLayer):
    """hf forward: one layer's KV for one batched forward: the past is already in
    ``keys[..., :past, :]``; the forward's new keys/values are written in place after it."""

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
