"""polyrec's preprocessing stage: readers → cleaning with accounting → features and splits → Parquet.

Imports none of the other stages.
"""
