"""Reading the project's Parquet files: list<float32> columns as numpy arrays."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    """A list<float32> column as float32 numpy arrays (no Python floats in between)."""
    column = table.column(name).combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # pyarrow may keep one chunk
        column = column.chunk(0) if column.num_chunks else pa.array([], column.type)
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
