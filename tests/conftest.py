import os
import tempfile

from hypothesis import HealthCheck, settings

# A fresh Inductor cache per test session: Inductor's on-disk cache does not key on a custom
# op's fake implementation, so code compiled before a change to one could be reused.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="gna_flex_inductor_"))

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("GNA_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
