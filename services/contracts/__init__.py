"""Generated protobuf code lives below this package (``make proto``; never edited by hand, not committed).

``services.contracts.bubuh.v1.*_pb2`` come from ``proto/bubuh/v1/*.proto``; ``make proto`` rewrites protoc's
cross-file imports (``from bubuh.v1 import ...``) to this package.
"""
