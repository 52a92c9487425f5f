"""Autoregressive generation over a static KV cache with a fixed number of slots.

:class:`SlotDecoder` is the one decoding core: a prompt is prefilled into a free slot (its first token
sampled from the prefill logits), then every live sequence advances one token per batched
:meth:`SlotDecoder.step`, each at its own position with its own sampling options and RNG. Plain
:func:`generate` and the continuous-batching engine both drive it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from gpa import native
from gpa.config import SamplingParams
from gpa.kv_cache import KV_DTYPES, KVCache
from gpa.logits import LogitFilter
from gpa.model import GPALM
from gpa.quant import head_module
from gpa.sampling import repetition_penalty, sample_next


@dataclass
class GenerationRequest:
    """One sequence to continue."""

    prompt: list[int]  # vocabulary ids
    params: SamplingParams
    filters: list[LogitFilter] = field(default_factory=list)  # output constraints
    stop: frozenset[int] = frozenset()  # ids that end the sequence (kept in the output)
    allowed: Tensor | None = None  # (V,) bool: the only ids it may emit (the head computes just those)
    # The first ``prefix`` prompt ids are shared by other requests (a voice's block): a decoder with a prefix
    # cache keeps their keys and values and prefills only the rest next time.
    prefix: int = 0


@dataclass(frozen=True)
class TokenEvent:
    """Row ``row`` produced ``token``; ``finished`` when it was a stop token or the length limit."""

    row: int
    token: int
    finished: bool


class _Head(NamedTuple):
    """An output head over one id set (a task's allowed ids)."""

    allowed: Tensor  # (V,) bool, kept alive so that its id() stays unique while it keys the head cache
    ids: Tensor  # (K,) int64, the set's ids in ascending order: the head's rows
    module: torch.nn.Module  # hidden (n, C) -> logits (n, K)
    index_of: Tensor  # (V,) int64: an id's row in the head, -1 outside the set


class SequenceState:
    """A request occupying one cache slot."""

    def __init__(self, request: GenerationRequest, slot: int, device: torch.device) -> None:
        self.request = request
        self.slot = slot
        self.length = len(request.prompt)  # tokens in the cache once the last one is fed
        self.output: list[int] = []
        self.generator = None
        if request.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.params.seed)
        self.device = device
        self._seen = set(request.prompt)  # ids the repetition penalty applies to
        self._seen_ids: Tensor | None = None

    @property
    def finished(self) -> bool:
        """True after a stop token or at the length limit."""
        if not self.output:
            return False
        return self.output[-1] in self.request.stop or len(self.output) >= self.request.params.max_new_tokens

    def constrain(self, logits: Tensor, ids: Tensor | None = None) -> None:
        """Apply this request's filters to its (1, V) logits in place, or to (1, K) logits over the ids ``ids``."""
        for f in self.request.filters:
            if ids is None:
                f.apply(logits, len(self.output))
            else:
                f.apply_ids(logits, ids, len(self.output))

    def record(self, token: int) -> None:
        self.output.append(token)
        if token not in self._seen:
            self._seen.add(token)
            self._seen_ids = None

    @property
    def seen_ids(self) -> Tensor:
        """(S,) int64: every distinct id of the prompt and the output so far."""
        if self._seen_ids is None:
            self._seen_ids = torch.tensor(sorted(self._seen), dtype=torch.long, device=self.device)
        return self._seen_ids


class SlotDecoder:
    """Owns the KV cache; admits sequences into free slots and advances them together."""

    def __init__(self, model: GPALM, slots: int, max_seq_len: int, restrict_head: bool = True,
                 prefix_cache: int = 0) -> None:
        """``prefix_cache``: how many request prefixes (``GenerationRequest.prefix``) keep their keys and values
        for later prompts that start with them (least recently used first out); 0: none."""
        cfg = model.config
        self.model = model.fuse()  # fewer, larger matmuls per step (same weights, no copy)
        self.restrict_head = restrict_head
        self.quant = getattr(model, "weight_quant", "none")
        # The output heads live in the model's head_cache, shared by every decoder of the model (building the
        # full int8 head of the 0.3B model takes ~0.4 s): "full" -> the whole head; id(allowed mask) -> (the
        # mask, kept alive so its id stays unique; its ids; a head over them), or None when the set is too large
        # for a separate copy of its rows to pay off.
        self._heads: dict[object, object] = model.head_cache
        version = _version(model.head_weight())  # weights changed in place since (training): rebuild
        if self._heads.get("version") != version:
            self._heads.clear()
            self._heads["version"] = version
        self.device = model.head_weight().device
        self.max_seq_len = max_seq_len
        # gpa's C++ decode kernels (model.native_decode, CPU): by default ("auto") they read an int8 cache wherever
        # the linear layers already run in bfloat16 (int8/int4 weights, a bf16 model): a quarter of float32's bytes
        # per step (bench/accuracy.py: +0.07 % logit error on the 0.3B shapes); model.kv_cache_dtype may choose.
        self.ops = None
        if getattr(model, "native_decode", False) and self.device.type == "cpu" and model.supports_native_decode():
            self.ops = native.load()
        kv_dtype = model.head_weight().dtype
        if self.ops is not None and model.linear_input_dtype() == torch.bfloat16:
            kv_dtype = torch.int8
        kv_dtype = KV_DTYPES.get(getattr(model, "kv_cache_dtype", "auto"), kv_dtype)
        self.cache = KVCache(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_seq_len, cfg.head_dim,
                             dtype=kv_dtype, device=self.device)
        self.free = list(range(slots))[::-1]  # pop() hands out slot 0 first
        if prefix_cache < 0:
            raise ValueError(f"prefix_cache must be >= 0, got {prefix_cache}")
        self.prefix_cache = prefix_cache
        self._prefixes: OrderedDict[tuple[int, ...], list[Tensor]] = OrderedDict()  # ids -> each cache tensor's part

    def check_fits(self, request: GenerationRequest) -> None:
        """Raise if the prompt is empty or prompt + max_new_tokens exceeds the cache length."""
        if not request.prompt:
            raise ValueError("empty prompt")
        needed = len(request.prompt) + request.params.max_new_tokens
        if needed > self.max_seq_len:
            new = request.params.max_new_tokens
            raise ValueError(f"prompt ({len(request.prompt)} tokens) plus max_new_tokens ({new}) needs {needed} "
                             f"positions; the limit is {self.max_seq_len}")

    @torch.inference_mode()
    def prefill(self, request: GenerationRequest) -> SequenceState:
        """Put ``request`` in a free slot, run its prompt and sample its first token."""
        state, logits = self.prefill_logits(request)
        self._choose([state], logits)
        return state

    @torch.inference_mode()
    def prefill_logits(self, request: GenerationRequest) -> tuple[SequenceState, Tensor]:
        """Put ``request`` in a free slot and run its prompt -> (its state, (1, V) next-token logits)."""
        self.check_fits(request)
        if not self.free:
            raise RuntimeError("no free KV-cache slot")
        state = SequenceState(request, self.free.pop(), self.device)
        start, store = self._reuse_prefix(request, state.slot)
        ids = torch.tensor([request.prompt[start:]], device=self.device)
        positions = torch.arange(start, len(request.prompt), device=self.device)[None]
        hidden = self.model(ids, positions=positions, cache=self.cache, cache_rows=slice(state.slot, state.slot + 1),
                            last_only=True, hidden_only=True)
        if store is not None:  # the prefix's keys and values, as this prefill wrote them
            self._prefixes[store] = [t[:, state.slot, :, : len(store)].clone() for t in self.cache.tensors()]
            while len(self._prefixes) > self.prefix_cache:
                self._prefixes.popitem(last=False)
        return state, self._logits(hidden[:, -1], [state])

    def _reuse_prefix(self, request: GenerationRequest, slot: int) -> tuple[int, tuple[int, ...] | None]:
        """Put a cached prefix of ``request`` into ``slot`` -> (positions already filled, the prefix to store
        after the prefill or None)."""
        n = request.prefix
        if not self.prefix_cache or not 0 < n < len(request.prompt):  # the last prompt id always runs
            return 0, None
        key = tuple(request.prompt[:n])
        stored = self._prefixes.get(key)
        if stored is None:
            return 0, key
        self._prefixes.move_to_end(key)
        for t, part in zip(self.cache.tensors(), stored, strict=True):
            t[:, slot, :, :n] = part
        return n, None

    @torch.inference_mode()
    def step(self, states: Sequence[SequenceState]) -> None:
        """Feed each state's last token and sample its next one (all in one forward pass).

        Rows restricted to an id set with its own head (TTS/VC: 8193 of 180k ids) whose filters can work on
        that set keep their logits in it (n, K): penalties and sampling touch K values per row, not the
        vocabulary (the same candidates in the same order). Rows are decided in groups that share such a head
        (the rest over the vocabulary), so a row is decided the same way whatever rows share its step: a TTS
        row beside an ASR row was sampled over the vocabulary, which rarely picked another token than alone.
        """
        states = sorted(states, key=lambda s: s.slot)
        hidden = self._hidden(states)
        groups: dict[int, tuple[_Head | None, list[int]]] = {}
        for i, s in enumerate(states):
            head = self._compact_head([s])
            groups.setdefault(id(head), (head, []))[1].append(i)
        for head, rows in groups.values():
            part = [states[i] for i in rows]
            h = hidden[torch.tensor(rows, device=hidden.device)] if len(rows) < len(states) else hidden
            if head is None:
                self._choose(part, self._logits(h, part))
            else:
                self._choose(part, head.module(h).float(), head)

    def _compact_head(self, states: Sequence[SequenceState]) -> _Head | None:
        """The restricted head every row can be decided over (one id set, filters that work on it), else None."""
        allowed = states[0].request.allowed
        if not self.restrict_head or allowed is None or any(s.request.allowed is not allowed for s in states):
            return None
        head = self._head(allowed)
        if head is None or not all(f.supports_ids for s in states for f in s.request.filters):
            return None
        return head

    @torch.inference_mode()
    def copy_slots(self, sources: Sequence[int], targets: Sequence[int], length: int, start: int = 0) -> None:
        """Copy cache positions [start, length) of slots ``sources`` to ``targets`` (a slot may be both; a
        slot copied onto itself is skipped)."""
        pairs = [(a, b) for a, b in zip(sources, targets, strict=True) if a != b]
        if not pairs or length <= start:
            return
        src = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([b for _, b in pairs], dtype=torch.long, device=self.device)
        for t in self.cache.tensors():  # keys, values (and an int8 cache's scales): slot on dim 1, position on 3
            t[:, dst, :, start:length] = t[:, src, :, start:length]  # the right side is gathered first

    @torch.inference_mode()
    def step_logits(self, states: Sequence[SequenceState]) -> Tensor:
        """Feed each state's last token -> (n, V) next-token logits, rows in ``states``' order (unconstrained)."""
        return self._logits(self._hidden(states), states)

    @torch.inference_mode()
    def _hidden(self, states: Sequence[SequenceState]) -> Tensor:
        """Feed each state's last token -> (n, C) final-norm hidden states, rows in ``states``' order."""
        ids = torch.tensor([[s.output[-1]] for s in states], device=self.device)  # (n, 1)
        positions = torch.tensor([[s.length] for s in states], device=self.device)  # (n, 1)
        slots = [s.slot for s in states]
        if self.ops is not None:  # the kernels index the cache by slot: no gather, whatever the slots
            hidden = self.model.decode_native(self.ops, ids[:, 0], positions[:, 0],
                                              torch.tensor(slots, device=self.device), self.cache)
        else:
            # Consecutive slots are a view of the cache; any other set is gathered (a copy per layer).
            consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
            rows = slice(slots[0], slots[0] + len(slots)) if consecutive else torch.tensor(slots, device=self.device)
            hidden = self.model(ids, positions, cache=self.cache, cache_rows=rows, hidden_only=True)[:, -1]
        for s in states:
            s.length += 1
        return hidden

    def release(self, state: SequenceState) -> None:
        """Return the state's slot; its stale cache entries are masked out by position."""
        self.free.append(state.slot)

    def _logits(self, hidden: Tensor, states: Sequence[SequenceState]) -> Tensor:
        """(n, C) hidden -> (n, V) fp32 logits; rows restricted to an id set get -inf elsewhere.

        The output head is the largest matrix of a small GPA (180k x 512): a TTS step needs only
        the 8192 semantic rows, so those are gathered once and used alone.
        """
        full = self._full()
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            allowed = s.request.allowed
            use = self.restrict_head and allowed is not None and self._head(allowed) is not None
            groups.setdefault(id(allowed) if use else -1, []).append(i)
        if list(groups) == [-1]:
            return full(hidden).float()
        out = torch.full((len(states), self.model.config.vocab_size), float("-inf"), device=hidden.device)
        for key, rows in groups.items():
            idx = torch.tensor(rows, device=hidden.device)
            if key == -1:
                out[idx] = full(hidden[idx]).float()
                continue
            head = self._head(states[rows[0]].request.allowed)
            out[idx[:, None], head.ids[None]] = head.module(hidden[idx]).float()
        return out

    def prepare_heads(self, allowed: Sequence[Tensor | None]) -> None:
        """Build now the output heads that requests constrained to ``allowed`` (None: unconstrained) will use."""
        for mask in allowed:
            if mask is None or self._head(mask) is None:
                self._full()

    def _full(self) -> torch.nn.Module:
        if "full" not in self._heads:
            self._heads["full"] = head_module(self.model.head_weight(), self.quant)
        return self._heads["full"]

    def _head(self, allowed: Tensor) -> _Head | None:
        if id(allowed) not in self._heads:
            ids = torch.nonzero(allowed).flatten().to(self.device)
            small = len(ids) <= allowed.numel() // 2
            if small:
                rows = self.model.head_weight().index_select(0, ids).contiguous()
                index_of = torch.full((allowed.numel(),), -1, dtype=torch.long, device=self.device)
                index_of[ids] = torch.arange(len(ids), device=self.device)
                self._heads[id(allowed)] = _Head(allowed, ids, head_module(rows, self.quant), index_of)
            else:
                self._heads[id(allowed)] = None
        return self._heads[id(allowed)]

    def _choose(self, states: Sequence[SequenceState], logits: Tensor, head: _Head | None = None) -> None:
        """Pick each row's next token from its logits: (n, V) over the vocabulary, or (n, K) over ``head.ids``
        (filters, penalties and sampling then touch K values per row; the same candidates in the same order)."""
        for i, s in enumerate(states):
            s.constrain(logits[i : i + 1], None if head is None else head.ids)
            seen = s.seen_ids
            if head is not None:  # the seen ids' columns, where they have one
                seen = head.index_of[seen]
                seen = seen[seen >= 0]
            repetition_penalty(logits[i], seen, s.request.params.repetition_penalty)
        tokens = sample_next(logits, [s.request.params for s in states], [s.generator for s in states])
        if head is not None:
            tokens = head.ids[tokens]
        for s, t in zip(states, tokens.tolist(), strict=True):
            s.record(t)


def _version(t: Tensor) -> int | None:
    """``t``'s in-place modification counter (None for inference tensors, which cannot be modified)."""
    try:
        return t._version
    except RuntimeError:
        return None


def iter_generate(model: GPALM, requests: Sequence[GenerationRequest], max_seq_len: int | None = None
                  ) -> Iterator[TokenEvent]:
    """Generate for every request at once, yielding each token as soon as it is chosen."""
    if not requests:
        return
    needed = max(len(r.prompt) + r.params.max_new_tokens for r in requests)
    decoder = SlotDecoder(model, len(requests), max_seq_len or needed)
    for r in requests:
        decoder.check_fits(r)
    states = []
    for row, r in enumerate(requests):
        states.append(decoder.prefill(r))
        yield TokenEvent(row, states[-1].output[-1], states[-1].finished)
    active = [(row, s) for row, s in enumerate(states) if not s.finished]
    while active:
        decoder.step([s for _, s in active])
        for row, s in active:
            yield TokenEvent(row, s.output[-1], s.finished)
        active = [(row, s) for row, s in active if not s.finished]


def generate(model: GPALM, requests: Sequence[GenerationRequest], max_seq_len: int | None = None) -> list[list[int]]:
    """Generated ids per request (stop token included when one was produced)."""
    out: list[list[int]] = [[] for _ in requests]
    for event in iter_generate(model, requests, max_seq_len):
        out[event.row].append(event.token)
    return out


@torch.inference_mode()
def beam_search(model: GPALM, request: GenerationRequest, beam_size: int) -> list[int]:
    """The most likely continuation found by a beam of ``beam_size`` sequences (whisper's decoder, without
    a length penalty: a finished sequence scores its summed log-probability over its length).

    Sampling options other than ``max_new_tokens`` do not apply (no temperature, penalty or RNG); the
    request's filters and allowed ids do. ``beam_size`` 1 is greedy decoding. Returns the output ids,
    stop token included when one ended it.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    limit = request.params.max_new_tokens
    decoder = SlotDecoder(model, beam_size, len(request.prompt) + limit + 1)
    root, logits = decoder.prefill_logits(request)
    states = [root] + [SequenceState(request, decoder.free.pop(), decoder.device) for _ in range(beam_size - 1)]
    decoder.copy_slots([root.slot] * (beam_size - 1), [s.slot for s in states[1:]], root.length)
    beams: list[tuple[float, list[int]]] = [(0.0, [])]  # (summed log-probability, output) per live beam
    finished: list[tuple[float, list[int]]] = []
    while True:
        candidates = []
        for row, (score, out) in enumerate(beams):
            root.output = out  # the filters look at the output length only
            row_logits = logits[row : row + 1].clone()
            root.constrain(row_logits)
            logp = row_logits.log_softmax(-1)[0]
            top = logp.topk(min(beam_size + 1, int(torch.isfinite(logp).sum())))
            candidates += [(score + v, out + [t], row)
                           for v, t in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        candidates.sort(key=lambda c: -c[0])
        kept: list[tuple[float, list[int], int]] = []
        for score, out, row in candidates:
            if out[-1] in request.stop or len(out) >= limit:
                finished.append((score, out))
            else:
                kept.append((score, out, row))
            if len(kept) == beam_size:
                break
        if len(finished) >= beam_size or not kept:
            break
        parents = [row for _, _, row in kept]
        slots = [s.slot for s in states[: len(kept)]]
        # the prompt's positions are the same in every slot: only the generated ones differ
        decoder.copy_slots([states[p].slot for p in parents], slots, states[0].length, len(request.prompt))
        for s, (_, out, _) in zip(states, kept, strict=False):
            s.output = out
        beams = [(score, out) for score, out, _ in kept]
        logits = decoder.step_logits(states[: len(kept)])
        for s in states[len(kept):]:  # every hypothesis sits at the same position
            s.length = states[0].length
    return max(finished, key=lambda f: f[0] / len(f[1]))[1]
