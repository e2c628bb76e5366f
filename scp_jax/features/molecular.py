"""RDKit compound features: Morgan fingerprints and standardized 2D descriptors, float32 [n_smiles, d]."""

import contextlib
from typing import Sequence

import numpy as np

from scp_jax.errors import UserError

MAX_MORGAN_BITS = 65536  # a float32 column per bit: beyond this the table, not the chemistry, grows


class InvalidSmiles(UserError):
    """An unparsable SMILES; `smiles_errors_of` turns it into a message naming the training file's row."""

    def __init__(self, row, text):
        super().__init__(f"invalid SMILES in row {row}: {text!r}")
        self.text = text


def parse_smiles(smiles: Sequence[str]):
    """RDKit molecules; an unparsable SMILES is a user error naming its position in `smiles`."""
    from rdkit import Chem, rdBase

    molecules = []
    with rdBase.BlockLogs():  # a bad SMILES is reported once, as a UserError, not as RDKit log noise
        for row, text in enumerate(smiles):
            molecule = Chem.MolFromSmiles(text) if isinstance(text, str) and text else None
            if molecule is None:
                raise InvalidSmiles(row, text)
            molecules.append(molecule)
    return molecules


@contextlib.contextmanager
def smiles_errors_of(train):
    """Report a bad SMILES among `train`'s compounds by file, column, compound and first file row:
    featurizers see the sorted compound list, whose positions mean nothing to the file's author."""
    try:
        yield
    except InvalidSmiles as err:
        names = {name for name, text in zip(train.compounds, train.compound_smiles) if text == err.text}
        row = next(row for row, name in enumerate(train.sm_name) if name in names)
        raise UserError(f"{train.source}: column 'SMILES' has invalid SMILES {err.text!r} for compound "
                        f"{train.sm_name[row]!r} (first at row {row})") from None


def morgan_fingerprints(smiles: Sequence[str], *, radius=2, n_bits=2048, counts=False):
    """Folded Morgan (ECFP-like) fingerprints: 0/1 bits, or per-bit environment counts."""
    from rdkit.Chem import rdFingerprintGenerator

    if radius < 0 or not 1 <= n_bits <= MAX_MORGAN_BITS:
        raise UserError(f"Morgan fingerprints need radius >= 0 and bits in [1, {MAX_MORGAN_BITS}],"
                        f" got radius={radius}, bits={n_bits}")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    fingerprint = generator.GetCountFingerprintAsNumPy if counts else generator.GetFingerprintAsNumPy
    molecules = parse_smiles(smiles)
    return np.array([fingerprint(m) for m in molecules], dtype=np.float32).reshape(len(molecules), n_bits)


def raw_descriptors(smiles: Sequence[str]):
    """All RDKit 2D descriptors (float64; NaN where RDKit fails), columns in `Descriptors._descList` order."""
    from rdkit.Chem import Descriptors

    molecules = parse_smiles(smiles)
    table = np.full((len(molecules), len(Descriptors._descList)), np.nan)
    for row, molecule in enumerate(molecules):
        for column, (_, compute) in enumerate(Descriptors._descList):
            try:
                table[row, column] = compute(molecule)
            except Exception:  # a few descriptors fail on odd molecules; left NaN, imputed later
                pass
    return table


def standardize_columns(table, std_floor=1e-6):
    """Impute non-finite values with the column median, drop constant columns, z-score the rest.

    Statistics come from the given rows, so a compound set gets one consistent scale; the floor keeps
    near-constant columns from being blown up into noise.
    """
    table = np.array(table, dtype=np.float64)
    finite = np.isfinite(table)
    with np.errstate(all="ignore"):
        medians = np.nanmedian(np.where(finite, table, np.nan), axis=0)
    table = np.where(finite, table, np.nan_to_num(medians, nan=0.0))
    varying = np.ptp(table, axis=0) > 0 if len(table) else np.zeros(table.shape[1], bool)
    table = table[:, varying]
    return ((table - table.mean(axis=0)) / np.maximum(table.std(axis=0), std_floor)).astype(np.float32)


def rdkit_descriptors(smiles: Sequence[str]):
    """Standardized RDKit 2D descriptors over this SMILES set (constant descriptors dropped)."""
    return standardize_columns(raw_descriptors(smiles))
