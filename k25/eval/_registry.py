"""inspect_ai entry point (setup.py `entry_points={"inspect_ai": [...]}`): registers the `k25` model API.

The import of the provider (and so of JAX and the sampler) waits until inspect asks for a `k25/...` model.
"""

from inspect_ai.model import ModelAPI, modelapi


@modelapi(name="k25")
def k25() -> type[ModelAPI]:
    from k25.eval.provider import K25ModelAPI

    return K25ModelAPI


# the tasks, so that `inspect eval k25/over_refusal` (or k25/text_heldout ...) finds them by name
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
from k25.eval.tasks.long_context import long_context_retrieval  # noqa: E402,F401
from k25.eval.tasks.swarm import swarm_search  # noqa: E402,F401
from k25.eval.tasks.text import text_heldout  # noqa: E402,F401
from k25.eval.tasks.vision import vision_heldout  # noqa: E402,F401
