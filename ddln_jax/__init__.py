"""ddln_jax: exact gradient and mirror flows of Deep Diagonal Linear Networks, in JAX."""

# ruff: noqa: I001  (grouped by topic, one import per module)
from ._init import (
    AssumptionA as AssumptionA,
    balanced_init as balanced_init,
    check_assumption_a as check_assumption_a,
    gaussian_init as gaussian_init,
    layered_init as layered_init,
    zero_first_init as zero_first_init,
)
from ._losses import (
    AbstractLoss as AbstractLoss,
    CallableLoss as CallableLoss,
    LeastSquares as LeastSquares,
    Logistic as Logistic,
)
from ._geometry import Geometry as Geometry
from ._flows import (
    AbstractFormulation as AbstractFormulation,
    DualFlow as DualFlow,
    LayerFlow as LayerFlow,
    MirrorFlow as MirrorFlow,
    ReducedFlow as ReducedFlow,
)
from ._solvers import (
    AbstractRosenbrock as AbstractRosenbrock,
    Auto as Auto,
    FlowField as FlowField,
    PolynomialInterpolation as PolynomialInterpolation,
    Rodas4 as Rodas4,
    Rodas5P as Rodas5P,
    natural_scale as natural_scale,
)
from ._controller import PredictiveController as PredictiveController
from ._solution import Status as Status, Trajectory as Trajectory, status_names as status_names
from ._simulate import simulate as simulate, simulate_jvp as simulate_jvp
from ._spec import SpecError as SpecError, SweepSpec as SweepSpec
from ._sweep import (
    load_trajectories as load_trajectories,
    summary as summary,
    sweep as sweep,
)
from ._results import StoreError as StoreError, open_results as open_results
from ._bounds import (
    BoundReport as BoundReport,
    PLEstimate as PLEstimate,
    bound_report as bound_report,
    c0 as c0,
    pl_bound as pl_bound,
    pl_constant as pl_constant,
    pl_estimate as pl_estimate,
    sublinear_bound as sublinear_bound,
)
from ._implicit_bias import (
    ImplicitBias as ImplicitBias,
    implicit_bias_limit as implicit_bias_limit,
    kernel_limit as kernel_limit,
    small_init_limit as small_init_limit,
    weighted_l1_interpolator as weighted_l1_interpolator,
)
from ._small_init import (
    EscapePrediction as EscapePrediction,
    measure_escape_time as measure_escape_time,
    phi_inf as phi_inf,
    phi_inf_constant as phi_inf_constant,
    predict_escape_time as predict_escape_time,
    scalar_hitting_time as scalar_hitting_time,
)
from ._saddles import (
    SaddleToSaddle as SaddleToSaddle,
    detect_saddles as detect_saddles,
    predict_first_jump as predict_first_jump,
    rescaled_time as rescaled_time,
)
from ._analysis import time_to_eps_table as time_to_eps_table

__version__ = "0.1.0"
from ._discrete import (
    Training as Training,
    effective_implicit_bias as effective_implicit_bias,
    effective_init as effective_init,
    gd_drift as gd_drift,
    sharpness as sharpness,
    stable_learning_rate as stable_learning_rate,
    train as train,
    train_runs as train_runs,
)
from ._sde import sgd_noise_factor as sgd_noise_factor, sgd_sde as sgd_sde
# Signed networks θ = θ⁺ − θ⁻ and model objects (docs/math.md, "Signed models")
from ._geometry import SignedGeometry as SignedGeometry, geometry_problems as geometry_problems
from ._implicit_bias import signed_implicit_bias_limit as signed_implicit_bias_limit
from ._models import (
    AbstractModel as AbstractModel,
    ProductModel as ProductModel,
    SignedModel as SignedModel,
    SignedDualFlow as SignedDualFlow,
    SignedLayerFlow as SignedLayerFlow,
    SignedMirrorFlow as SignedMirrorFlow,
    SignedReducedFlow as SignedReducedFlow,
    as_model as as_model,
    shape_scale_init as shape_scale_init,
    signed_escape_time as signed_escape_time,
    signed_gaussian_init as signed_gaussian_init,
    signed_kernel_limit as signed_kernel_limit,
    signed_small_init_limit as signed_small_init_limit,
    woodworth_init as woodworth_init,
)
