"""What the L1-style architectures (relu_l1, gated) share: an L1 coefficient given directly, or a target L0
(`target_l0`) that the coefficient is steered to during training (actors/train/calibration.py), so that they can be
compared with TopK at the same sparsity."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

HOLD_FRACTION = 0.1  # default of train.target_l0_hold_fraction: the coefficient is held fixed for this final part


class L1Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    l1_coefficient: float | None = Field(None, gt=0, description="Weight of the decoder-norm-weighted L1 penalty.")
    target_l0: float | None = Field(None, gt=0, description="Steer the L1 coefficient during training to reach "
                                    "this L0 instead.")
    lr: float | None = Field(None, gt=0, description="Learning rate of this architecture's SAEs; None: train.lr, else "
                             "the recipe's 2e-4, which needs a long run (tens of thousands of steps) to learn.")

    @model_validator(mode="after")
    def _a_sparsity_setting(self):
        # Both are present in a trained SAE's cfg: the target and the coefficient it ended trained with.
        if self.l1_coefficient is None and self.target_l0 is None:
            raise ValueError("give l1_coefficient or target_l0")
        return self


class TargetL0:
    """Mixin (before SparseAutoencoder) for an architecture whose `Params` derive from L1Params."""

    target_l0_controls = "l1_coefficient"

    @classmethod
    def validate_sweep(cls, spec: dict[str, Any], where: str) -> None:
        if "l1_coefficient" in spec and "target_l0" in spec:
            raise ValueError(f"{where}: give exactly one of l1_coefficient and target_l0")
        super().validate_sweep(spec, where)

    @classmethod
    def check_width(cls, params: dict[str, Any], width: int) -> str | None:
        if params.get("target_l0") is not None and params["target_l0"] >= width:
            return f"target_l0={params['target_l0']} must be below the width ({width})"
        return super().check_width(params, width)

    @classmethod
    def target_l0_data_parallel(cls, params: dict[str, Any]) -> str | None:
        """Why a target L0 cannot train data-parallel (see SparseAutoencoder.check_data_parallel), or None."""
        if params.get("target_l0") is not None:
            return ("target_l0 steers the L1 coefficient step by step from one process's L0; give l1_coefficient "
                    "instead")
        return None

    @property
    def l1_coefficient(self) -> float:
        """The coefficient the loss uses now (steered ones are set in `params` step by step)."""
        if self.params.l1_coefficient is None:
            raise RuntimeError(f"{self.name} with target_l0: the L1 coefficient is set by training (actors/train/training.py)")
        return self.params.l1_coefficient
