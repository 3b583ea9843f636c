"""ddln_jax: exact gradient and mirror flows of Deep Diagonal Linear Networks, in JAX."""

from ._geometry import Geometry as Geometry
from ._init import (
    AssumptionA as AssumptionA,
)
from ._init import (
    balanced_init as balanced_init,
)
from ._init import (
    check_assumption_a as check_assumption_a,
)
from ._init import (
    gaussian_init as gaussian_init,
)
from ._init import (
    layered_init as layered_init,
)
from ._init import (
    zero_first_init as zero_first_init,
)
from ._losses import (
    AbstractLoss as AbstractLoss,
)
from ._losses import (
    CallableLoss as CallableLoss,
)
from ._losses import (
    LeastSquares as LeastSquares,
)
from ._losses import (
    Logistic as Logistic,
)

__version__ = "0.1.0"
from ._flows import (
    AbstractFormulation as AbstractFormulation,
)
from ._flows import (
    DualFlow as DualFlow,
)
from ._flows import (
    LayerFlow as LayerFlow,
)
from ._flows import (
    MirrorFlow as MirrorFlow,
)
from ._flows import (
    ReducedFlow as ReducedFlow,
)
from ._results import open_results as open_results
from ._simulate import Status as Status
from ._simulate import Trajectory as Trajectory
from ._simulate import simulate as simulate
from ._spec import SpecError as SpecError
from ._spec import SweepSpec as SweepSpec
from ._sweep import summary as summary
from ._sweep import sweep as sweep
