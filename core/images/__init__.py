"""Layer 5, images: documents, references, transports, and the import and export pipeline.

TODO: the public namespace of image documents.
"""
