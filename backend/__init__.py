"""Occupancy-network backend: models, mesh extraction, the reconstruction pipeline, the CLI and the
pipe server that the Blender add-on runs as a child process. Never imports bpy."""

__version__ = "0.1.0"
