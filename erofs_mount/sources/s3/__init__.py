"""EROFS images kept as S3 objects: ``options.py`` (pure: location, ``-o s3.*``, URLs),
``signing.py`` (credentials and signatures, botocore), ``client.py`` (pinned, conditional Range
GETs), ``source.py`` (``open_s3_source``)."""
