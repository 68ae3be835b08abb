"""Record and example formats of TensorFlow's data pipelines, read and written without it.

    crc32c           CRC-32C (Castagnoli) and TFRecord's masked form of it
    tfrecord         TFRecord files: framing, GZIP / ZLIB streams, index files, a sharded and
                     shuffled torch IterableDataset
    example          tf.train.Example and SequenceExample protocol buffers (encode, decode,
                     parse_example with FixedLenFeature / VarLenFeature specs)
    farmhash         FarmHash Fingerprint64 and FingerprintCat64, the hashes of TensorFlow's
                     hash buckets and crosses
    feature_columns  TensorFlow's feature columns as torch modules, DenseFeatures

The modules are imported by name (``from mlatlas.data.formats import tfrecord``); this package
imports none of them.
"""
