"""Switch a peft model's adapters off for the reference forward, cheaply.

peft's ``PeftModel.disable_adapter()`` is correct but slow to enter and leave:
it asks ``get_model_status()`` (several walks over every module and
parameter) and flips ``requires_grad`` on every adapter weight both ways.
Measured on this project's 2-core CPU for a 16-layer Llama with LoRA on every
linear layer: about 45 ms a use. The DPO step uses it once per micro-batch,
and on a GPU that host time is time the device waits.

:class:`AdapterSwitch` finds the adapter layers once and flips only the flag
their forward reads (``_disable_adapters``, what peft's own
``enable_adapters(False)`` sets on LoRA layers and on ``modules_to_save``
wrappers). ``requires_grad`` is left alone: the reference forward runs under
``torch.no_grad()``, where it changes nothing. Models this does not cover
(prompt learning, adaption prompts, layers without the flag) go through
peft's own context manager.
"""

from __future__ import annotations

import contextlib


class AdapterSwitch:
    def __init__(self, peft_model):
        self.model = peft_model
        self.layers = _flag_layers(peft_model)
        # what evaluating() flips: every module but bitsandbytes' layers, which stay in training
        # mode for the reason plait.model.forward.probing gives (an eval forward repacks 4-bit
        # weights in place on some CPUs); listed once, as a walk of the model costs ~15 ms a step
        self.modules = [m for m in peft_model.modules() if not type(m).__module__.startswith("bitsandbytes")]

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode (no dropout, no NEFTune noise) for the reference forward;
        every module's own training flag comes back afterwards."""
        with _set_meanwhile(self.modules, "training", False):
            yield

    @contextlib.contextmanager
    def off(self):
        if self.layers is None:
            with self.model.disable_adapter():
                yield
            return
        with _set_meanwhile(self.layers, "_disable_adapters", True):
            yield


@contextlib.contextmanager
def _set_meanwhile(objects, attribute: str, value):
    """``attribute`` of every one of ``objects`` set to ``value`` inside the
    block; each object's own value comes back afterwards."""
    # object.__setattr__: what nn.Module.__setattr__ ends in for a plain attribute (not a parameter, buffer or
    # module), without its checks, which cost ~2 us a module, on a thousand modules twice a step
    before = [getattr(obj, attribute) for obj in objects]
    for obj in objects:
        object.__setattr__(obj, attribute, value)
    try:
        yield
    finally:
        for obj, old in zip(objects, before):
            object.__setattr__(obj, attribute, old)


def _flag_layers(peft_model):
    """The modules whose ``_disable_adapters`` flag switches the adapters off,
    or ``None`` where the flag alone would not do what peft's context does."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # another peft layout: use its own context
        return None
    config = peft_model.peft_config.get(peft_model.active_adapter)
    if config is None or config.is_prompt_learning or getattr(config, "is_adaption_prompt", False):
        return None
    layers = [m for m in peft_model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    if not layers or not all(hasattr(layer, "_disable_adapters") for layer in layers):
        return None
    return layers
