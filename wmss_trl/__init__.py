"""wmss_trl: Weak-Driven Learning (WMSS, arXiv 2602.08222) for Hugging Face TRL."""

__version__ = "0.1.0"

from .mixing import mixed_cross_entropy, mixed_token_logprobs  # noqa: E402
from .sft import WMSSSFTConfig, WMSSSFTTrainer  # noqa: E402
from .dpo import WMSSDPOConfig, WMSSDPOTrainer  # noqa: E402
from .negatives import MiningConfig, mine_negatives  # noqa: E402
from .grpo import WMSSGRPOConfig, WMSSGRPOTrainer  # noqa: E402

__all__ = ["WMSSSFTConfig", "WMSSSFTTrainer", "mixed_cross_entropy", "mixed_token_logprobs"]
__all__ += ["WMSSGRPOConfig", "WMSSGRPOTrainer"]
__all__ += ["WMSSDPOConfig", "WMSSDPOTrainer", "MiningConfig", "mine_negatives"]
