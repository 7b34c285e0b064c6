"""Distillation losses as weighted sums over targets, the convention of `jaxfm.train.step`
(the step divides by the batch's total target weight).

Soft targets follow Hinton et al. (2015): KL(teacher || student) of the temperature-T
softmaxes, scaled by T^2 so the gradients keep their size as T changes; a regression head
takes the squared error to the teacher's output instead. Hidden states follow TinyBERT: the
mean squared error between the student's (projected) and the teacher's states; DistilBERT's
cosine loss the cosine distance between them. Attention
follows MiniLM (Wang et al., 2020): the KL between the teacher's and the student's per-head
self-attention distributions, softmax(Q K^T / sqrt(d)), and value relations,
softmax(V V^T / sqrt(d)); MiniLMv2 (Wang et al., 2021) adds query and key relations, over
relation heads that need not be the models' own. A cached teacher's top-k logits
(`teacher_cache`) give the soft targets over their support, renormalised. A QA head's soft
targets are its start and end distributions over the positions (DistilBERT's SQuAD recipe).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


# The logit of a position no softmax may pick (padding of a QA window): exp() of it is 0 and,
# unlike -inf, it keeps differences of logits finite.
MASKED = -1e9


def head_logits(output: Any, attention_mask: jax.Array) -> jax.Array:
  """A task head's output as logits [..., classes]: [b, classes] or [b, t, classes] as they
  are; a QA head's (start, end) [b, t] each as [b, 2, t], distributions over the positions
  with the padding masked out."""
  if isinstance(output, tuple):
    span = jnp.stack(output, axis=1).astype(jnp.float32)  # [b, 2, t]
    return jnp.where(attention_mask[:, None, :] > 0, span, MASKED)
  return output


def target_weights(output: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """The weight of each soft target of `head_logits(output)`, as the task loss weighs it: per
  example [b]; per labelled token [b, t] (NER: each word's first sub-word); per span end
  [b, 2] (QA: start and end half an example each)."""
  if isinstance(output, tuple):
    return jnp.broadcast_to(0.5 * batch["weights"][:, None], (batch["weights"].shape[0], 2))
  if output.ndim == 3:
    return (batch["labels"] >= 0) * batch["weights"][:, None]
  return batch["weights"]


def soft_target_kl(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array,
                   temperature: float) -> jax.Array:
  """sum_targets weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)).

  Logits [..., classes] (float32), weights [...] (0 = no target).
  """
  teacher_log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  student_log_p = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)  # [...]
  return temperature ** 2 * jnp.sum(kl * weights)


def soft_target_mse(student_out: jax.Array, teacher_out: jax.Array,
                    weights: jax.Array) -> jax.Array:
  """sum_targets weight * sum_outputs (student - teacher)^2: outputs [..., n], weights [...]."""
  return jnp.sum(jnp.sum(jnp.square(student_out - teacher_out), axis=-1) * weights)


def project(states: jax.Array, projection: dict[str, jax.Array] | None) -> jax.Array:
  """[..., student width] -> [..., teacher width] through a learned linear map (or as is)."""
  if projection is None:
    return states
  return states @ projection["kernel"] + projection["bias"]


def hidden_mse(student: jax.Array, teacher: jax.Array, token_weights: jax.Array) -> jax.Array:
  """Mean over weighted tokens and features of (student - teacher)^2.

  States [b, t, d] in the same width (see `project`), token_weights [b, t] (0 = padding).
  """
  per_token = jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)),
                       axis=-1)  # [b, t]
  return jnp.sum(per_token * token_weights) / jnp.maximum(jnp.sum(token_weights), 1.0)


def cosine_distance(student: jax.Array, teacher: jax.Array, token_weights: jax.Array
                    ) -> jax.Array:
  """Mean over weighted tokens of 1 - cos(student, teacher) (DistilBERT's cosine loss).

  States [b, t, d] in the same width, token_weights [b, t] (0 = padding).
  """
  s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
  cos = jnp.sum(s * t, axis=-1) / jnp.maximum(
      jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), 1e-8)  # [b, t]
  return jnp.sum((1.0 - cos) * token_weights) / jnp.maximum(jnp.sum(token_weights), 1.0)


def init_projection(rng: jax.Array, student_width: int, teacher_width: int,
                    scale: float = 0.02) -> dict[str, Any]:
  """A linear map student width -> teacher width: kernel ~ N(0, scale^2), bias 0."""
  return {"kernel": scale * jax.random.normal(rng, (student_width, teacher_width), jnp.float32),
          "bias": jnp.zeros((teacher_width,), jnp.float32)}


def relation_kl(student: tuple[jax.Array, jax.Array], teacher: tuple[jax.Array, jax.Array],
                key_mask: jax.Array, query_weights: jax.Array) -> jax.Array:
  """MiniLM's relation transfer: KL(teacher || student) of softmax(A B^T / sqrt(d)) over the
  keys, per head, averaged over heads and weighted queries.

  (A, B): (queries, keys) for attention distributions, (values, values) for value relations,
  each [b, t, heads, d] (d may differ between student and teacher, heads may not);
  key_mask [b, t] (0 = padding, never attended), query_weights [b, t] (0 = not counted).
  """
  def log_relation(a: jax.Array, b: jax.Array) -> jax.Array:  # -> [b, heads, t, t]
    scores = jnp.einsum("bqnd,bknd->bnqk", a.astype(jnp.float32), b.astype(jnp.float32))
    scores = jnp.where(key_mask[:, None, None, :] > 0, scores * a.shape[-1] ** -0.5,
                       jnp.finfo(jnp.float32).min)
    return jax.nn.log_softmax(scores, axis=-1)

  log_s, log_t = log_relation(*student), log_relation(*teacher)
  per_key = jnp.where(key_mask[:, None, None, :] > 0, jnp.exp(log_t) * (log_t - log_s), 0.0)
  per_query = jnp.mean(jnp.sum(per_key, axis=-1), axis=1)  # [b, t]: mean over heads
  return jnp.sum(per_query * query_weights) / jnp.maximum(jnp.sum(query_weights), 1.0)


def relation_heads(x: jax.Array, heads: int) -> jax.Array:
  """MiniLMv2's relation heads: [b, t, n, d] -> the n heads concatenated, split into `heads`,
  [b, t, heads, n * d / heads]."""
  b, t, n, d = x.shape
  return x.reshape(b, t, heads, n * d // heads)


def top_k_kl(student_logits: jax.Array, teacher_values: jax.Array, teacher_indices: jax.Array,
             weights: jax.Array, temperature: float) -> jax.Array:
  """`soft_target_kl` against a teacher known by its top-k logits only: the teacher's
  distribution is the softmax of its k logits (renormalised on their support), the student's
  its full temperature-T softmax read at the k indices.

  student_logits [..., classes]; teacher_values [..., k] float, teacher_indices [..., k] int;
  weights [...]. Equal to `soft_target_kl` when the k indices cover every class.
  """
  teacher_log_p = jax.nn.log_softmax(teacher_values / temperature, axis=-1)  # [..., k]
  student_log_p = jnp.take_along_axis(
      jax.nn.log_softmax(student_logits / temperature, axis=-1), teacher_indices, axis=-1)
  kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)  # [...]
  return temperature ** 2 * jnp.sum(kl * weights)
