"""ModelRunner: the guard's model, its KV pool and its CUDA graphs; one step at a time.

Every guard call goes through ``ModelRunner.run``: a plain ``GuardSession``
(one segment per step, on the guard's own runner) and a ``GuardEngine`` (the
segments of every waiting session, on the engine's runner). A step:

1. makes room in the pool for every segment's new tokens (``KVPool.reserve``);
2. packs the new tokens of all segments into one row and uploads the step's
   integers (ids, positions, KV slots, region bases and lengths, arithmetic)
   in one host-to-device copy;
3. runs the backbone with transformers' own Qwen3 modules and weights over
   the packed row (each token at its own session's position), writing each
   layer's new keys and values into the pool with one ``index_copy_``;
   attention (``guard.attention``): the rows of segments of up to
   ``GATHER_SEGMENT_TOKENS`` tokens in one batched call, longer segments
   (prompt chunks) each in place over their own slice. The batched call is
   ``attention``'s choice: the Triton decode kernel, which reads the pool in
   place (``guard.decode_attention``; opt-in until it has run on a GPU,
   see ``TRITON_BY_DEFAULT``), or ``GatheredAttention`` (the default);
4. runs the response heads (and, in a step holding a prompt, the query
   heads) over every row and turns the logits into verdict numbers on the
   device (``guard.verdict_math``), then copies them to the host once;
5. commits: each region's length grows by its tokens. A step that raises
   commits nothing (the keys it wrote lie past the lengths), so the caller's
   session is as it was.

On CUDA a step whose rows all take the batched attention runs as a CUDA
graph per (rows, span) bucket (``guard.step_graphs``). On the CPU every
segment attends in place (``in_place_from`` 0): measured on the 2-core
machine (fp32, 8 key/value heads of 128), the one masked call over gathered
keys costs about what the calls per session cost at ~100 positions (16
rows: 1.0-1.8 ms against 1.2-1.5 ms) and 2-3x more from 200 positions on
(CPU SDPA's masked path, and the gather's copy: 39 ms for the 66 MB of 16
rows at 1,000 positions, where the attention itself takes 17 ms), so on the
CPU only the rest of the step (projections, MLP, heads, verdicts) is batched.
Tests run the batched path on the CPU too (``in_place_from = None``), the
Triton kernel in Triton's interpreter. Not measured yet: any of this on a GPU
(``benchmarks/gpu_check.py`` checks and times it, both attentions).

With ``fused="on"`` on CUDA (and with "auto" once ``TRITON_BY_DEFAULT``) step 3 runs fused
(``guard.fused``): Triton kernels for RMSNorm with the residual add before
it, for q_norm, k_norm and rotary with the KV pool write, and for SiLU times
up; q/k/v and gate/up as one matmul each. 11 kernels per layer for a decode
row instead of 58 (``benchmarks/fused_check.py`` counts them, and times the
step both ways on a GPU), in transformers' arithmetic, rounded where it
rounds. The CPU keeps transformers' modules; the kernels run there only
under Triton's interpreter, for the tests (``fused="on"``).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from guard.attention import GatheredAttention, attend_in_place, attention_backends
from guard.decode_attention import TritonDecodeAttention, decode_attention_unsupported
from guard.kv_pool import KVPool, KVRegion
from guard.model import GuardLogits
from guard.step_graphs import StepGraphs
from guard.verdict_math import verdict_columns

if TYPE_CHECKING:
    from guard.stream_guard import StreamGuard

__all__ = [
    "TRITON_BY_DEFAULT", "AttentionMode", "FusedMode", "GraphMode", "Judged", "ModelRunner", "Segment", "StepOutput",
]  # fmt: skip

#: "auto": CUDA graphs on CUDA, none elsewhere; "eager": the graphs' fixed
#: shapes and static buffers without capturing (any device: for tests and
#: debugging); "off": never.
GraphMode = Literal["auto", "eager", "off"]
#: Whether "auto" takes the Triton kernels (the decode attention and the
#: fused layers) on CUDA. Not yet: they compile for sm_80 and sm_90 and agree
#: with torch in Triton's interpreter (tests), but have never run on a GPU, so
#: until ``benchmarks/gpu_check.py`` has passed on one, a guard computes with
#: torch's own kernels unless asked (``attention="triton"``, ``fused="on"``).
TRITON_BY_DEFAULT = False

#: The batched attention: "triton", the decode kernel reading the pool in
#: place (``guard.decode_attention``); "gather", ``GatheredAttention``; "auto":
#: the kernel on CUDA when ``TRITON_BY_DEFAULT`` and triton imports and serves
#: the model's head_dim, else the gather.
AttentionMode = Literal["auto", "triton", "gather"]

#: A session's new tokens in one step, up to this many, go in the batched attention.
GATHER_SEGMENT_TOKENS = 8
#: On the CPU, rows whose cache will hold more positions than this attend in place: all (see the module docstring).
CPU_IN_PLACE_FROM = 0

#: "auto": the fused layers (``guard.fused``: Triton kernels, stacked
#: projections) on CUDA when ``TRITON_BY_DEFAULT`` and Triton imports,
#: transformers' modules elsewhere;
#: "on": fused on any device (on the CPU only under Triton's interpreter,
#: ``TRITON_INTERPRET=1``: for tests); "off": never.
FusedMode = Literal["auto", "on", "off"]


@dataclass(slots=True)
class Segment:
    """One session's new ids in a step, its verdict arithmetic, and whether
    it wants the query heads (a prompt) besides the response heads."""

    region: KVRegion
    ids: list[int]
    upstream: bool
    query: bool = False


@dataclass(slots=True)
class StepOutput:
    """Per row of a step: the response heads' verdict numbers, then the
    query heads' when the step ran them (``COLUMNS`` each, see
    ``guard.verdict_math``); both heads' logits, on the model's device."""

    rows: list[list[float]]
    response: GuardLogits
    query: GuardLogits | None
    offsets: list[int]  # of each segment's first row, and the end

    def part(self, index: int) -> Judged:
        return Judged([(self, self.offsets[index], self.offsets[index + 1])])


class Judged:
    """What the steps said about one session's ids: rows ``start:end`` of
    one or more steps' outputs. The logits are sliced only when asked for
    (``last_logits``), not by the worker for every session of every step."""

    __slots__ = ("_spans",)

    def __init__(self, spans: list[tuple[StepOutput, int, int]]) -> None:
        self._spans = spans

    @staticmethod
    def concat(parts: list[Judged]) -> Judged:
        return parts[0] if len(parts) == 1 else Judged([span for part in parts for span in part._spans])

    def __len__(self) -> int:
        return sum(end - start for _, start, end in self._spans)

    @property
    def rows(self) -> list[list[float]]:
        if len(self._spans) == 1:
            output, start, end = self._spans[0]
            return output.rows[start:end]
        return [row for output, start, end in self._spans for row in output.rows[start:end]]

    def tail(self, first: int) -> Judged:
        """The rows from ``first`` on."""
        spans = []
        for output, start, end in self._spans:
            if first < end - start:
                spans.append((output, start + max(first, 0), end))
            first -= end - start
        return Judged(spans)

    @property
    def response(self) -> GuardLogits:
        return self._logits([(output.response, start, end) for output, start, end in self._spans])

    @property
    def query(self) -> GuardLogits:
        return self._logits([(output.query, start, end) for output, start, end in self._spans])

    @staticmethod
    def _logits(spans: list[tuple[GuardLogits, int, int]]) -> GuardLogits:
        if len(spans) == 1:
            logits, start, end = spans[0]
            return GuardLogits(logits.risk_level[start:end], logits.category[start:end])
        return GuardLogits(
            torch.cat([logits.risk_level[start:end] for logits, start, end in spans]),
            torch.cat([logits.category[start:end] for logits, start, end in spans]),
        )


#: The integers a step uploads, one row each (``StepPlan.integers``).
IDS, POSITIONS, SLOTS, BASES, LENGTHS, UPSTREAM = range(6)
STEP_INTEGERS = 6


class StepPlan:
    """The host side of a step: its integers and which rows attend how."""

    def __init__(self, segments: list[Segment], in_place_from: int | None) -> None:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bases: list[int] = []
        lengths: list[int] = []
        upstream: list[int] = []
        self.offsets = [0]
        self.gathered_rows: list[int] = []
        self.in_place: list[tuple[int, int, int, int]] = []  # (offset, count, base, start)
        self.longest = 0  # positions a gathered row attends over, at most
        self.query = False
        gather_up_to = GATHER_SEGMENT_TOKENS
        for segment in segments:
            region, new = segment.region, segment.ids
            count, offset, start, base = len(new), len(ids), region.length, region.base
            gathered = count <= gather_up_to and (in_place_from is None or start + count <= in_place_from)
            if count == 1:  # the common case, a decode token: no ranges to build
                ids.append(new[0])
                positions.append(start)
                slots.append(base + start)
                bases.append(base)
                lengths.append(start + 1)
                upstream.append(segment.upstream)
                if gathered:
                    self.gathered_rows.append(offset)
            else:
                ids += new
                positions += range(start, start + count)
                slots += range(base + start, base + start + count)
                bases += [base] * count
                lengths += range(start + 1, start + count + 1)
                upstream += [segment.upstream] * count
                if gathered:
                    self.gathered_rows += range(offset, offset + count)
            self.offsets.append(offset + count)
            self.query |= segment.query
            if gathered:
                self.longest = max(self.longest, start + count)
            else:
                self.in_place.append((offset, count, base, start))
        self.total = total = len(ids)
        # One tensor, so that the step uploads its integers in one copy: the
        # six rows, then (when not every row is gathered) the gathered rows.
        mixed = self.gathered_rows if len(self.gathered_rows) < total else []
        self.integers = torch.tensor(ids + positions + slots + bases + lengths + upstream + mixed, dtype=torch.long)
        flags = sum(upstream)
        #: The arithmetic of every row, when they agree (one softmax instead of two).
        self.upstream: bool | None = True if flags == total else False if flags == 0 else None


class _MixedAttention:
    """A step's attention when some segments attend in place: the gathered
    rows in one call, then each in-place segment over its own slice."""

    def __init__(
        self, gathered: GatheredAttention | TritonDecodeAttention | None, rows: torch.Tensor | None, plan: StepPlan
    ) -> None:
        self.gathered, self.rows, self.in_place, self.total = gathered, rows, plan.in_place, plan.total

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        heads, head_dim = query.shape[1:]
        attended = query.new_empty((self.total, heads * head_dim))
        if self.gathered is not None:
            attended.index_copy_(0, self.rows, self.gathered(query.index_select(0, self.rows), keys, values, scale))
        for offset, count, base, start in self.in_place:
            end = offset + count
            attended[offset:end] = attend_in_place(query[offset:end], keys, values, base, start, scale)
        return attended


def _attend_one(query, keys, values, scale, *, base: int, start: int) -> torch.Tensor:
    return attend_in_place(query, keys, values, base, start, scale)


def span_for(positions: int) -> int:
    """Positions a gathered row reads: a multiple of 16 (aligned for CUDA's kernels)."""
    return -(-positions // 16) * 16


class ModelRunner:
    """Runs steps of the guard's model over a KV pool of its own (one at a time: ``lock``)."""

    def __init__(
        self,
        guard: StreamGuard,
        *,
        graphs: GraphMode = "auto",
        max_graph_rows: int = 256,
        attention: AttentionMode = "auto",
        fused: FusedMode = "auto",
    ) -> None:
        if graphs not in ("auto", "eager", "off"):
            raise ValueError(f"graphs must be 'auto', 'eager' or 'off', got {graphs!r}")
        self.model = guard.model
        self.config = guard.config
        self.device = guard.device
        #: The fused layers (``guard.fused``), or None: transformers' modules, as ``layers`` shows.
        self.fused = _fused_layers(guard.model, self.device, fused)
        self.pool = KVPool(guard.config, dtype=guard.dtype, device=guard.device)
        #: Held by the thread running a step (and by a fork's copy): the only
        #: code that moves data in the pool.
        self.lock = threading.Lock()
        cuda = self.device.type == "cuda"
        #: Rows whose cache will hold more positions attend in place (None: never; see the module docstring).
        self.in_place_from: int | None = None if cuda else CPU_IN_PLACE_FROM
        capture = graphs == "auto" and cuda
        fixed_shapes = capture or graphs == "eager"
        self.graphs = StepGraphs(self, capture=capture, max_rows=max_graph_rows) if fixed_shapes else None
        self.attention: Literal["triton", "gather"] = "gather"
        self.use_attention(attention)

    def use_attention(self, attention: AttentionMode) -> None:
        """Choose the batched attention (see ``AttentionMode``); drops the graphs captured with the other."""
        if attention not in ("auto", "triton", "gather"):
            raise ValueError(f"attention must be 'auto', 'triton' or 'gather', got {attention!r}")
        head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        unsupported = decode_attention_unsupported(head_dim, self.device)
        if attention == "triton" and unsupported is not None:
            raise ValueError(f"attention='triton': {unsupported}; use attention='gather' (or 'auto')")
        if attention == "auto":
            kernel = TRITON_BY_DEFAULT and self.device.type == "cuda" and unsupported is None
            attention = "triton" if kernel else "gather"
        with self.lock:
            self.attention = attention
            self.batched_attention = TritonDecodeAttention if attention == "triton" else GatheredAttention
            if self.graphs is not None:
                self.graphs.clear()

    def run(self, segments: list[Segment]) -> StepOutput:
        with self.lock, torch.inference_mode(), attention_backends(self.device):
            self.pool.trim()
            for segment in segments:
                self.pool.reserve(segment.region, segment.region.length + len(segment.ids))
            plan = StepPlan(segments, self.in_place_from)
            graphs = self.graphs
            if graphs is not None and not plan.in_place and plan.total <= graphs.max_rows:
                rows, response, query = graphs.run(plan)
            else:
                rows, response, query = self._eager(plan)
            for segment in segments:
                segment.region.length += len(segment.ids)
            return StepOutput(rows, response, query, plan.offsets)

    def copy_kv(self, source: KVRegion, target: KVRegion) -> None:
        """Give ``target`` the cached positions of ``source`` (a fork): a copy, no forward."""
        with self.lock, torch.inference_mode():
            self.pool.copy(source, target)

    # --- the step ---------------------------------------------------------------------

    def _eager(self, plan: StepPlan) -> tuple[list[list[float]], GuardLogits, GuardLogits]:
        uploaded = plan.integers.to(self.device, non_blocking=True)
        integers = uploaded[: STEP_INTEGERS * plan.total].view(STEP_INTEGERS, plan.total)
        gathered = rows = None
        if plan.gathered_rows:
            rows = None if len(plan.gathered_rows) == plan.total else uploaded[STEP_INTEGERS * plan.total :]
            bases, lengths = integers[BASES], integers[LENGTHS]
            if rows is not None:
                bases, lengths = bases.index_select(0, rows), lengths.index_select(0, rows)
            gathered = self.batched_attention(bases, lengths, span_for(plan.longest), self.pool.capacity)
        if rows is None and not plan.in_place:
            attend = gathered
        elif gathered is None and len(plan.in_place) == 1:  # one segment (a plain session): no packing to do
            _, _, base, start = plan.in_place[0]
            attend = functools.partial(_attend_one, base=base, start=start)
        else:
            attend = _MixedAttention(gathered, rows, plan)
        hidden = self.layers(integers[IDS], integers[POSITIONS], integers[SLOTS], attend)
        upstream = plan.upstream if plan.upstream is not None else integers[UPSTREAM].bool()
        packed, response, query = self.judge(hidden, upstream, plan.query)
        return packed.tolist(), response, query  # the step's one device-to-host copy

    def layers(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend) -> torch.Tensor:
        """Final normed hidden states ``[tokens, hidden]`` of the packed ``ids``;
        writes their keys and values into the pool at ``slots``. ``attend(query
        [tokens, heads, head_dim], keys, values, scale)`` reads the pool."""
        if self.fused is not None:
            return self.fused(ids, positions, slots, attend, self.pool.storage, self.config.num_hidden_layers)
        backbone = self.model.model
        config = self.config
        total = ids.shape[0]
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        storage = self.pool.storage
        hidden = backbone.embed_tokens(ids[None])  # [1, tokens, hidden]: one packed row
        cos, sin = backbone.rotary_emb(hidden, positions[None])
        for index, layer in enumerate(backbone.layers[: config.num_hidden_layers]):
            attention = layer.self_attn
            head_dim = attention.head_dim
            residual = hidden
            normed = layer.input_layernorm(hidden)
            query = attention.q_norm(attention.q_proj(normed).view(1, total, heads, head_dim))
            key = attention.k_norm(attention.k_proj(normed).view(1, total, kv_heads, head_dim))
            value = attention.v_proj(normed).view(1, total, kv_heads, head_dim)
            query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2)
            keys, values = storage[index, 0], storage[index, 1]
            keys.index_copy_(0, slots, key[0])
            values.index_copy_(0, slots, value[0])
            attended = attend(query[0], keys, values, attention.scaling)
            hidden = residual + attention.o_proj(attended[None])
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return backbone.norm(hidden)[0]

    def judge(
        self, hidden: torch.Tensor, upstream: bool | torch.Tensor, query: bool
    ) -> tuple[torch.Tensor, GuardLogits, GuardLogits | None]:
        """The response heads (and the query heads if ``query``) over every
        row, and their verdict numbers ``[rows, COLUMNS or 2 * COLUMNS]``."""
        response = self.model.response_logits(hidden)
        numbers = verdict_columns(response, upstream)
        if not query:
            return numbers, response, None
        query_logits = self.model.query_logits(hidden)
        return torch.cat([numbers, verdict_columns(query_logits, upstream)], dim=1), response, query_logits


def _fused_layers(model: torch.nn.Module, device: torch.device, mode: FusedMode):
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"fused must be 'auto', 'on' or 'off', got {mode!r}")
    cuda = device.type == "cuda"
    if mode != "on" and not cuda:
        return None
    if mode == "auto" and not TRITON_BY_DEFAULT:
        mode = "off"
    try:
        from guard.fused import INTERPRETED, FusedLayers, stacked_projections, unfusable_reason
    except ImportError as error:
        if mode == "on":
            raise ImportError("fused='on' needs Triton (pip install triton), or pass fused='off'") from error
        return None
    reason = unfusable_reason(model)
    if not cuda and not INTERPRETED:
        reason = f"the kernels need CUDA, or Triton's interpreter (TRITON_INTERPRET=1) on the {device.type}"
    if reason is not None:
        if mode == "on":
            raise ValueError(f"fused='on' cannot run this model: {reason}; pass fused='off'")
        return None
    if mode == "off":
        # Stack the projections all the same (values unchanged): a fused runner built later would
        # otherwise move the weights from under this runner's CUDA graphs (``stacked_projections``).
        stacked_projections(model)
        return None
    return FusedLayers(model)
