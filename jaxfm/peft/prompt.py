"""Prompt tuning (Lester et al., 2021): trainable embeddings of virtual tokens before the input.

As huggingface/peft runs it on BERT: the prompt stands in for the word embeddings of
`num_virtual_tokens` tokens before each row (position and token-type embeddings added, then the
embedding LayerNorm), the attention mask is extended with ones, and a sequence classifier's
pooler reads the first virtual token (`jaxfm.models.encoder.BertEncoder`). The prompt starts as
the word embeddings of `peft.prompt_init_text`'s tokens, repeated to length, or, without a text,
of tokens drawn from the vocabulary (peft's SAMPLE_VOCAB init).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import flax.linen as nn
import jax.numpy as jnp

from jaxfm.models.encoder import EMBED, PEFT_PROMPT
from jaxfm.peft.sites import WORD_EMBEDDINGS, EncoderDims, boxed_like


def init(flat: Mapping[str, Any], rng: jax.Array, settings: Any,
         text_ids: Sequence[int] = ()) -> dict[str, Any]:
  """{'prompt': [virtual, embed]}: word-embedding rows of `text_ids` (repeated to length) or,
  without them, of random vocabulary ids."""
  n = settings.num_virtual_tokens
  table = nn.meta.unbox(flat[WORD_EMBEDDINGS])  # [vocab, embed]
  if text_ids:
    ids = jnp.asarray((list(text_ids) * -(-n // len(text_ids)))[:n], jnp.int32)
  else:
    ids = jax.random.randint(rng, (n,), 0, table.shape[0])
  return {PEFT_PROMPT: boxed_like(EncoderDims.of(flat).like, table[ids].astype(jnp.float32),
                                  (None, EMBED))}


def hooks(adapter: Mapping[str, Any], settings: Any, dims: EncoderDims) -> dict[str, Any]:
  del settings, dims
  return {PEFT_PROMPT: adapter[PEFT_PROMPT]}
