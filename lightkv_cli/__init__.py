"""lightkv: profile how much of a vision-language model's KV cache can be thrown away.

Library entry point::

    from lightkv_cli import LightKV
    press = LightKV(layers=[12, 18, 24], windows=[4, 2, 1], ratios=[0.5, 0.5, 0.5])
    with press(model):
        out = model.generate(**inputs, max_new_tokens=32)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LightKV", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `lightkv --help` does not pay for importing torch and transformers.
    if name == "LightKV":
        from lightkv_cli.methods.lightkv import LightKV

        return LightKV
    raise AttributeError(name)
