"""The model: the seed's dual encoder, its checkpoint, preprocessing and batched encoding.

Owns ``MultiModalEncoder``, checkpoint reading, image and text preprocessing, the fingerprint and
``Encoder``. Imports only the core modules (errors, durable, progress).
"""
