"""Callbacks that track saturation inside training frameworks.

Each framework has its own module, imported only when asked for, so ``import delve``
never imports a framework:

* :mod:`delve.integrations.lightning` — ``SaturationCallback`` for Lightning's ``Trainer``
  (``pip install delve[lightning]``);
* :mod:`delve.integrations.transformers` — ``SaturationCallback`` for Hugging Face's
  ``Trainer`` (``pip install delve[transformers]``).
"""
