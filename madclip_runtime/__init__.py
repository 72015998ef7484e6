"""madclip_runtime: torch-free serving of MadCLIP bundles. Research use, not for clinical decisions."""
__version__ = "0.1.0"
INTENDED_USE = "research use, not for clinical decisions"
