"""Compiled sampling and teacher-forced scoring for the JAX decoder.

Sampling is one compiled program per (batch, prompt length, new tokens) shape: the prompt
fills a key/value cache, then a ``lax.while_loop`` draws one token per step for every row,
by pure temperature sampling (greedy at 0), until every row has ended or the budget is
spent. No Python runs between tokens. Shapes are rounded up (rows to a multiple of 8,
prompt length to a multiple of 32) so a stage's batches reuse a few programs.

The number grammar runs inside the loop as two tables built once per tokenizer from
:class:`lmpipeline.grammar.TokenGrammar`: ``allowed[state, c]`` and ``next_state[state, c]``
over the ``C`` tokens any number list can use (digits, separators, brackets, end). Every
state reachable from the start is enumerated, so the tables are exactly the grammar's
decisions; a row's state advances by one lookup per token.

Scoring runs each prompt once into a cache and scores its continuations as a batch over
copies of that cache, the same scheme as the torch backend.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmpipeline.backends.jaxlm.model import Cache, Decoder
from lmpipeline.grammar import TokenGrammar


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket(n: int) -> int:
    """The next power of two: batch sizes compile a few programs and waste at most half."""
    return 1 << max(0, n - 1).bit_length()


class GrammarTables(NamedTuple):
    """A :class:`TokenGrammar` as arrays; state 0 is the start, the last state is "ended"."""

    vocabulary: jax.Array  # [C] token ids
    allowed: jax.Array  # [S, C] bool
    next_state: jax.Array  # [S, C] int32
    column: jax.Array  # [V] int32: a token's column in ``vocabulary``, -1 if none


def grammar_tables(grammar: TokenGrammar, vocab_size: int) -> GrammarTables:
    """Enumerate every state reachable from the start and tabulate the grammar on them."""
    vocabulary = list(grammar.vocabulary)
    index = {grammar.grammar.start: 0}
    order = [grammar.grammar.start]
    rows_allowed, rows_next = [], []
    for state in order:  # grows while it is walked: a breadth-first search
        allowed = set(grammar.allowed(state) or grammar.eos_ids)
        row_a, row_n = [], []
        for token in vocabulary:
            ok = token in allowed
            nxt = grammar.advance(state, token) if ok else None
            if nxt is not None and nxt not in index:
                index[nxt] = len(order)
                order.append(nxt)
            row_a.append(ok)
            row_n.append(-1 if nxt is None else index[nxt])
        rows_allowed.append(row_a)
        rows_next.append(row_n)
    ended = len(order)
    eos = set(grammar.eos_ids)
    rows_allowed.append([t in eos for t in vocabulary])  # after the end: only end tokens, as padding
    rows_next.append([ended] * len(vocabulary))
    next_state = np.array(rows_next, dtype=np.int32)
    next_state[next_state < 0] = ended
    column = np.full(vocab_size, -1, dtype=np.int32)
    column[vocabulary] = np.arange(len(vocabulary), dtype=np.int32)
    return GrammarTables(
        jnp.asarray(vocabulary, jnp.int32), jnp.asarray(rows_allowed), jnp.asarray(next_state), jnp.asarray(column)
    )


def left_pad(rows: list[list[int]], width: int, n_rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, valid)`` of shape ``[n_rows, width]``, rows right-aligned; rows past ``len(rows)``
    hold one pad token, so no row is empty."""
    ids = np.full((n_rows, width), pad_id, dtype=np.int32)
    valid = np.zeros((n_rows, width), dtype=bool)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = row
        valid[r, width - len(row) :] = True
    valid[len(rows) :, -1] = True
    return ids, valid


def positions_of(valid: jax.Array) -> jax.Array:
    """Position of each token in its row, counting real tokens only (0 on the left pad)."""
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)


@partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy"))
def sample(
    graphdef,
    state,
    ids: jax.Array,
    valid: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    eos: jax.Array,
    tables: GrammarTables | None,
    *,
    max_new: int,
    greedy: bool,
) -> jax.Array:
    """``[B, max_new]`` sampled tokens after left-padded prompts ``ids``; a row that has
    ended continues with its first end token."""
    model: Decoder = nnx.merge(graphdef, state)
    rows, width = ids.shape
    cache = Cache.zeros(model.config, rows, width + max_new, model.dtype)
    key_valid = jnp.concatenate([valid, jnp.ones((rows, max_new), bool)], axis=1)
    positions = positions_of(valid)
    logits, cache = model(ids, positions, key_valid, cache, 0, keep=1)
    out = jnp.full((rows, max_new), eos[0], jnp.int32)
    grammar_state = jnp.zeros((rows,), jnp.int32)
    done = jnp.zeros((rows,), bool)

    def cond(carry):
        step, _, _, _, done, _, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, grammar_state, done, out, key, position = carry
        logits = logits[:, -1]
        if tables is not None:
            allowed = tables.allowed[grammar_state]  # [B, C]
            mask = jnp.full(logits.shape, -jnp.inf).at[:, tables.vocabulary].set(jnp.where(allowed, 0.0, -jnp.inf))
            logits = logits + mask
        key, draw = jax.random.split(key)
        if greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            token = jax.random.categorical(draw, logits / temperature, axis=-1).astype(jnp.int32)
        token = jnp.where(done, eos[0], token)
        out = out.at[:, step].set(token)
        if tables is not None:
            grammar_state = tables.next_state[grammar_state, jnp.maximum(tables.column[token], 0)]
        done = done | jnp.isin(token, eos)
        logits, cache = model(token[:, None], position[:, None], key_valid, cache, width + step, keep=1)
        return step + 1, logits, cache, grammar_state, done, out, key, position + 1

    carry = (0, logits, cache, grammar_state, done, out, key, positions[:, -1] + 1)
    return jax.lax.while_loop(cond, body, carry)[5]


@partial(jax.jit, static_argnames=("graphdef",))
def prompt_cache(graphdef, state, ids: jax.Array, valid: jax.Array):
    """Run one left-padded prompt ``[1, P]``; returns its last next-token log-probabilities and its cache."""
    model: Decoder = nnx.merge(graphdef, state)
    cache = Cache.zeros(model.config, 1, ids.shape[1], model.dtype)
    logits, cache = model(ids, positions_of(valid), valid, cache, 0, keep=1)
    return jax.nn.log_softmax(logits[0, -1]), cache


@partial(jax.jit, static_argnames=("graphdef",))
def tail_logprobs(graphdef, state, cache: Cache, prompt_valid: jax.Array, bodies: jax.Array, body_valid: jax.Array):
    """Next-token log-probabilities after each token of ``bodies`` ``[R, W]`` (right-padded),
    fed after the cached prompt: ``[R, W, V]``."""
    model: Decoder = nnx.merge(graphdef, state)
    rows, width = bodies.shape
    prompt_len = cache.k.shape[2]
    grown = Cache(
        *(
            jnp.concatenate(
                [jnp.repeat(c, rows, axis=1), jnp.zeros((*c.shape[:1], rows, width, *c.shape[3:]), c.dtype)], 2
            )
            for c in cache
        )
    )
    key_valid = jnp.concatenate([jnp.repeat(prompt_valid, rows, axis=0), body_valid], axis=1)
    start = jnp.sum(prompt_valid)
    positions = start + jnp.broadcast_to(jnp.arange(width), (rows, width))
    logits, _ = model(bodies, positions, key_valid, grown, prompt_len)
    return jax.nn.log_softmax(logits, axis=-1)
