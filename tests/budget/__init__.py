"""Tests for `mlora budget`: byte math, presets, trace replay, CLI."""
