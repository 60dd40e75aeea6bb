"""laminae: container-image layers on disk, through pluggable storage drivers."""
