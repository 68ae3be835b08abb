"""Record and example formats of TensorFlow's data pipelines, read and written without it.

    crc32c           CRC-32C (Castagnoli) and TFRecord's masked form of it
    tfrecord         TFRecord files: framing, GZIP / ZLIB streams, index files, a sharded and
                     shuffled torch IterableDataset
    example          tf.train.Example protocol buffers (encode_example, decode_example)
    feature_columns  feature columns over decoded examples

The modules are imported by name (``from mlatlas.data.formats import tfrecord``); this package
imports none of them.
"""
