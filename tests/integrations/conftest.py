"""Tests against the real ecosystem (transformers, peft, timm, torchvision): they skip where
those packages are missing and run in CI's integration stage (.ci/integration.sh)."""
