"""DPO against the weak checkpoint: ``WMSSDPOConfig`` / ``WMSSDPOTrainer`` (a drop-in TRL ``DPOTrainer``).

The reference policy of DPO is the weak model M_w (an earlier checkpoint of the strong model; with a PEFT policy and
``peft_base_as_weak=True``, the adapter-disabled base). With every option off the loss is TRL's, with ref = M_w:

    L = mean_i loss_type( beta * [ (log pi(y+|x) - log M_w(y+|x)) - (log pi(y-|x) - log M_w(y-|x)) ] )

Two optional WMSS pieces:

* WD-JT (``mixing_lambda < 1``): the policy's token log-probs come from the mixed logits,
      log pi_mix(y_t) = log softmax(lam * z_strong + (1 - lam) * z_weak)[y_t],
  so every TRL loss type is evaluated on pi_mix; only the strong model is trained and saved.
* Entropy-gap pair weights (``entropy_pair_weights=True``): with H_w(i), H_s(i) the mean token entropy (nats) of the
  weak and of the current strong model on the rejected answer of pair i, and dH_i = H_s(i) - H_w(i) (strong minus
  weak, as in WD-DS),
      u_i = a * H_w(i) / mean(H_w) + b * max(0, -dH_i) / mean(max(0, -dH)) + c * max(0, dH_i) / mean(max(0, dH))
      w_i = u_i / (a + b * [mean(max(0, -dH)) > 0] + c * [mean(max(0, dH)) > 0])          (so mean_i w_i = 1)
  (a, b, c) = (pair_weight_alpha, pair_weight_beta, pair_weight_gamma), WD-DS's 0.1 / 0.8 / 0.1 by default: most of
  the weight goes to the pairs whose wrong answer the strong model has become *more* certain about than the weak one.
  Means are over the micro-batch of all processes (with gradient accumulation, each micro-batch is normalised on its
  own). A term whose mean is 0 is left out. The weights scale the
  gradient of each pair, grad L = (1/B) * sum_i w_i * grad l_i; the ``loss`` TRL logs stays the unweighted mean.

With no weak model (and ``peft_base_as_weak=False``) WMSS is inactive: the trainer is TRL's ``DPOTrainer``, with TRL's
default reference (a copy of the policy, the adapter-disabled PEFT model, or precomputed log-probs); the WMSS options
that need a weak model (``mixing_lambda < 1``, ``entropy_pair_weights``) are then refused.

Metrics (namespace ``wmss/``): ``weak_logps/{chosen,rejected}``; with WD-JT ``strong_logps/{chosen,rejected}``
(the strong model alone); with pair weights ``weak_entropy/rejected``, ``strong_entropy/rejected``,
``entropy_gap/rejected`` (mean dH) and ``pair_weight/{min,max,std}``.

The parts: ``config.py`` (the config), ``data.py`` (input checks), ``policy.py`` (the policy forward TRL's loss sees,
and its pure functions), ``trainer.py`` (the overrides: ``_prepare_dataset``, ``_precompute_ref_logps``,
``_compute_loss``).
"""

from .config import WMSSDPOConfig
from .policy import scale_grad, sequence_logps
from .trainer import WMSSDPOTrainer


__all__ = ["WMSSDPOConfig", "WMSSDPOTrainer", "scale_grad", "sequence_logps"]
