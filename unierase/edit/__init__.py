"""Stage B of UniErase, the unlearning edit: AlphaEdit on the MLP down_proj of `edit.layers`
(docs/algorithm.md, "Stage B: the unlearning edit").

The steps, in the order a run takes them, and where each lives:

  corpus.py      the generic text whose keys stand for preserved knowledge
  statistics.py  second moments C0_l of those keys per layer (cached on disk)
  projector.py   null-space projector P_l from C0_l's small-eigenvalue directions (cached on disk)
  prompts.py     the texts a request is read on: chat prompt, context templates, subject position
  capture.py     hooks that read down_proj inputs and layer outputs at those positions
  keys.py        the keys K: a request's down_proj inputs at its key position
  values.py      the values z*: the layer-L output that makes the model say the target (replay.py: its
                 fast forward)
  update.py      the closed-form null-space update Delta W_l, spread over the edited layers
  state.py       the edit state a sequential run persists (cumulative Delta W, past keys)
  apply.py       the driver: requests in chunks, values, updates, state; and edited_fraction
  config.py      EditConfig and EditRequest
"""
from unierase.edit.apply import apply_edits, edited_fraction
from unierase.edit.config import EditConfig, EditRequest
from unierase.edit.projector import nullspace_projectors
from unierase.edit.state import EditState
from unierase.edit.statistics import second_moments

__all__ = ["EditConfig", "EditRequest", "EditState", "apply_edits", "edited_fraction", "nullspace_projectors",
           "second_moments"]
