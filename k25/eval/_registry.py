"""inspect_ai entry point (setup.py `entry_points={"inspect_ai": [...]}`): registers the `k25` model API.

The import of the provider (and so of JAX and the sampler) waits until inspect asks for a `k25/...` model.
"""

from inspect_ai.model import ModelAPI, modelapi


@modelapi(name="k25")
def k25() -> type[ModelAPI]:
    from k25.eval.provider import K25ModelAPI

    return K25ModelAPI


# the suite's tasks, so that `inspect eval k25/over_refusal` finds them by name
from k25.eval.safety.tasks import (  # noqa: E402,F401
    agentic_alignment,
    cbrne_uplift,
    censorship_bias,
    cyber_capability,
    cyber_offence,
    harmful_compliance,
    over_refusal,
    social_bias,
    sycophancy_delusion,
)
