"""MFCon Studio: MFA-Conformer + MFCon loss studies."""

__version__ = "0.1.0"
