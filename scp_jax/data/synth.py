"""A synthetic world with the real task's schema, layout and statistics, plus its hidden answers.

Why: the real test labels are not public, so models are compared on worlds where the truth (a
noisy observation of the queried rows) and the Bayes-optimal prediction (the oracle) are known.

Generative model, per (cell type i, compound c, gene g):
  compound latent  z_c = sqrt(chem) * standardized(MorganBits(SMILES_c) @ A) + sqrt(1 - chem) * noise,
                   chem = 0.6 (`chem_share`: the variance share explained by chemistry)
  potency          p_c = median * exp(sigma * d_c), d_c drawn like one more entry of z_c (60% chemistry,
                   40% noise by variance): a few potent, many weak compounds
  cell embedding   u_i = shared + deviation; the T/NK types share most of it, B/Myeloid less;
                   factor 0 is a common response, positive in every cell type
  effect           e_icg = cap * tanh(p_c * ((z_c * u_i) @ L + off_target_c)_g / cap)  (fold changes saturate)
  observation      t = e * sqrt(cells / 100) + s * N(0, 1)
                   y = sign(t) * -log10(two-sided normal p-value of t)
where L is a sparse rank-`rank` gene loading with heavy-tailed gene scales, `cells` is the
pseudo-bulk size (about a third of rows are poor quality: few cells and overdispersion s > 1).
The squared t makes y heavy-tailed, as in the real limma statistics.

The oracle is E[y | t's mean, s]: a one-dimensional expectation over the normal noise, tabulated
with Gauss-Hermite quadrature on a fine grid and linearly interpolated (error below 1e-4). It knows
each query row's cell count and quality, which no model can. The effect oracle, E[y | e] averaged
over the query cell type's distribution of cell counts and quality, is what a model that learned
every effect e exactly would predict gene by gene: a practical floor (not a strict one, since one
unknown cell count scales a whole row and MRRMSE is not a per-gene squared error).
"""

import collections
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from scp_jax.atomic import atomic_path, default_mode, write_text
from scp_jax.config import MAX_SYNTH_GENES
from scp_jax.data.dataset import HELD_OUT_CELLS, ID_MAP_COLUMNS, read_csv, read_id_map
from scp_jax.data.pvalues import expected_signed_log10_p, signed_log10_p
from scp_jax.errors import UserError

VERSION = 3  # bump whenever generated numbers change: cached default worlds are rebuilt
CELL_TYPES = ("NK cells", "T cells CD4+", "T cells CD8+", "T regulatory cells", "B cells", "Myeloid cells")
N_COMPOUNDS = 146
N_WITH_HELD_OUT_ROWS = 17  # compounds with B/Myeloid training rows, the 2 controls included
N_MISSING_CD8 = 4
N_MISSING_QUERIES = {"B cells": 1, "Myeloid cells": 2}  # 128 + 127 = 255 id_map rows
CONTROL_SMILES = {
    "Belinostat": "O=C(/C=C/c1cccc(S(=O)(=O)Nc2ccccc2)c1)NO",
    "Dabrafenib": "CC(C)(C)c1nc(-c2cccc(NS(=O)(=O)c3c(F)cccc3F)c2F)c(-c2ccnc(N)n2)s1",
}
REFERENCE_FILES = ("genes.txt", "compounds_smiles.csv", "id_map.csv")
REFERENCE_COMPOUND_COLUMNS = ("sm_name", "sm_lincs_id", "SMILES", "in_de_train", "train_has_B_Myeloid", "role")


@dataclasses.dataclass(frozen=True)
class Params:
    """Generator knobs, recorded in world.json."""

    rank: int = 16
    loading_density: float = 0.25  # fraction of (factor, gene) loadings that are nonzero
    gene_scale_sigma: float = 0.4  # lognormal spread of per-gene responsiveness
    chem_share: float = 0.6  # variance share of the compound latent explained by chemistry
    morgan_radius: int = 2
    morgan_bits: int = 2048
    potency_median: float = 0.55
    potency_sigma: float = 0.7
    control_potency_quantile: float = 0.97
    common_response: float = 1.0  # shift of factor 0: a response most compounds share
    common_response_spread: float = 0.25  # lognormal spread of its strength across cell types
    t_cell_sharing: float = 0.9  # share of cell embedding common to all cell types, T/NK
    held_out_sharing: float = 0.8  # the same for B/Myeloid
    off_target_density: float = 0.003
    effect_cap: float = 8.0  # effects saturate: cap * tanh(effect / cap), as fold changes do
    off_target_scale: float = 1.5
    median_cells: tuple = (("NK cells", 200), ("T cells CD4+", 300), ("T cells CD8+", 80),
                           ("T regulatory cells", 150), ("B cells", 120), ("Myeloid cells", 150))
    poor_fraction: float = 1 / 3
    poor_cells_factor: float = 0.15
    poor_overdispersion: float = 1.4


# ----------------------------------------------------------------------------- compounds


_SCAFFOLDS = (  # {0..2}: substituent slots, each "" or "(R)"
    ("tinib", "c1cc{0}ccc1Nc1ncc{1}c(-c2ccc{2}cc2)n1"),
    ("rafenib", "c1cc{0}c2ncnc(Nc3ccc{1}cc3)c2c1{2}"),
    ("lisib", "O=c1c{0}c(-c2ccc{1}cc2)oc2cc{2}ccc12"),
    ("ciclib", "c1cc2c{0}c{1}n(C3CCCC3)c2nc1N{2}"),
    ("stat", "O=C(NO)C{0}Cc1ccc{1}c(N{2})c1"),
    ("zomib", "CC(C)CC(NC(=O)c1cnc{0}c{1}n1)B(O)O{2}"),
    ("parib", "O=C1NCCc2c1cc{0}c{1}c2N{2}"),
    ("gliptin", "N#Cc1ccccc1CN1C(=O)C{0}C(N2CCC{1}C2)N(C{2})C1=O"),
    ("azole", "c1cc{0}ccc1-c1nc2cc{1}ccc2n1C{2}"),
    ("setron", "O=C(CN1CCN{0}CC1)c1c{1}[nH]c2ccc{2}cc12"),
    ("olimus", "OC1CCN(Cc2cc{0}cc{1}c2)CC1{2}"),
    ("adine", "c1nc{0}c2nc{1}n(C3CC{2}OC3)c2n1"),
)
_SUBSTITUENTS = (
    "F", "Cl", "Br", "C", "CC", "C(F)(F)F", "OC", "OCC", "N(C)C", "C#N", "C(=O)N", "C(=O)O",
    "S(=O)(=O)N", "[N+](=O)[O-]", "N1CCOCC1", "C1CC1", "c1ccncc1", "NC(=O)C", "C1CCNCC1", "O",
)
_SYLLABLES = ("ze", "va", "lo", "mi", "ra", "te", "no", "ci", "pa", "du", "ve", "ki", "so", "be", "fa",
              "ro", "li", "ta", "gu", "ne")


def _synthetic_compounds(rng, n):
    """n distinct drug-like compounds: shared scaffolds x substituents, RDKit-canonical SMILES."""
    from rdkit import Chem

    seen = set(CONTROL_SMILES.values())
    names = set(CONTROL_SMILES)
    out = []
    while len(out) < n:
        suffix, scaffold = _SCAFFOLDS[rng.integers(len(_SCAFFOLDS))]
        slots = [f"({_SUBSTITUENTS[rng.integers(len(_SUBSTITUENTS))]})" if rng.random() < 0.65 else ""
                 for _ in range(3)]
        smi = Chem.MolToSmiles(Chem.MolFromSmiles(scaffold.format(*slots)))
        if smi in seen:
            continue
        name = "".join(_SYLLABLES[k] for k in rng.integers(len(_SYLLABLES), size=2)).capitalize() + suffix
        if name in names:
            continue
        seen.add(smi)
        names.add(name)
        out.append((name, smi))
    return out


def morgan_bits(smiles, radius, n_bits):
    """[n, n_bits] 0/1 Morgan fingerprints: the substructure indicators behind the chemistry."""
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    return np.stack([generator.GetFingerprintAsNumPy(Chem.MolFromSmiles(s)) for s in smiles]).astype(np.float64)


def _invalid_smiles(smiles):
    """The row of the first SMILES RDKit cannot parse (or an empty one), or None."""
    from rdkit import Chem, rdBase

    with rdBase.BlockLogs():
        return next((row for row, text in enumerate(smiles)
                     if not isinstance(text, str) or Chem.MolFromSmiles(text) is None), None)


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Layout:
    compounds: pd.DataFrame  # sm_name, sm_lincs_id, SMILES, control
    train: pd.DataFrame  # cell_type, sm_name: the de_train rows in file order
    queries: pd.DataFrame  # id, cell_type, sm_name: the id_map rows
    genes: tuple


def _synthetic_layout(rng, n_genes):
    made = _synthetic_compounds(rng, N_COMPOUNDS - len(CONTROL_SMILES))
    names = list(CONTROL_SMILES) + [name for name, _ in made]
    compounds = pd.DataFrame({
        "sm_name": names,
        "sm_lincs_id": [f"LSM-{1000 + k}" for k in range(len(names))],
        "SMILES": list(CONTROL_SMILES.values()) + [smi for _, smi in made],
        "control": [k < len(CONTROL_SMILES) for k in range(len(names))],
    })
    others = rng.permutation(names[len(CONTROL_SMILES):])
    with_held_out = list(CONTROL_SMILES) + list(others[: N_WITH_HELD_OUT_ROWS - len(CONTROL_SMILES)])
    queries = _query_rows(rng, [c for c in names if c not in with_held_out])
    genes = tuple(f"G{k:05d}" for k in range(1, n_genes + 1))
    return _Layout(compounds, _train_rows(rng, compounds, with_held_out), queries, genes)


def _query_rows(rng, test_compounds):
    dropped = iter(rng.choice(test_compounds, sum(N_MISSING_QUERIES.values()), replace=False))  # distinct: every
    rows = []  # test compound keeps at least one query, as in the real id_map
    for cell, n_missing in N_MISSING_QUERIES.items():
        missing = {next(dropped) for _ in range(n_missing)}
        rows += [(cell, c) for c in sorted(test_compounds) if c not in missing]
    queries = pd.DataFrame(rows, columns=["cell_type", "sm_name"])
    queries.insert(0, "id", np.arange(len(queries)))
    return queries


def _train_rows(rng, compounds, with_held_out):
    """T/NK rows for every compound (CD8+ lacks 4), B/Myeloid rows only for `with_held_out`."""
    test_compounds = [c for c in compounds.sm_name if c not in set(with_held_out)]
    missing_cd8 = set(rng.choice(test_compounds, N_MISSING_CD8, replace=False))
    rows = []
    for compound in rng.permutation(compounds.sm_name.to_numpy()):
        for cell in CELL_TYPES:
            if cell in HELD_OUT_CELLS and compound not in with_held_out:
                continue
            if cell == "T cells CD8+" and compound in missing_cd8:
                continue
            rows.append((cell, compound))
    return pd.DataFrame(rows, columns=["cell_type", "sm_name"])


def _reference_layout(rng, reference, n_genes):
    reference = Path(reference)
    for name in REFERENCE_FILES:
        if not (reference / name).is_file():
            raise UserError(f"reference dir {reference} lacks {name}")
    genes = tuple((reference / "genes.txt").read_text().split())
    if n_genes > len(genes):
        raise UserError(f"--genes {n_genes} exceeds the {len(genes)} genes in {reference / 'genes.txt'}")
    repeated = next((gene for gene, count in collections.Counter(genes).items() if count > 1 or gene == "id"), None)
    if repeated is not None:
        raise UserError(f"{reference / 'genes.txt'}: gene {repeated!r} is "
                        + ("the name of a submission's key column" if repeated == "id" else "listed twice"))
    table = read_csv(reference / "compounds_smiles.csv", text=("sm_name", "SMILES"),
                     required=REFERENCE_COMPOUND_COLUMNS)
    table = table[table["in_de_train"].astype(bool)].reset_index(drop=True)
    invalid = _invalid_smiles(table["SMILES"])
    if invalid is not None:
        smiles = table["SMILES"][invalid]
        smiles = smiles if isinstance(smiles, str) else ""  # an empty cell reads as NaN
        raise UserError(f"{reference / 'compounds_smiles.csv'}: invalid SMILES {smiles!r} for compound"
                        f" {table['sm_name'][invalid]!r}")
    compounds = pd.DataFrame({
        "sm_name": table["sm_name"].astype(str),
        "sm_lincs_id": table["sm_lincs_id"].astype(str),
        "SMILES": table["SMILES"].astype(str),
        "control": table["role"].eq("positive_control"),
    })
    with_held_out = list(table.loc[table["train_has_B_Myeloid"].astype(bool), "sm_name"])
    queries = pd.DataFrame(dict(zip(ID_MAP_COLUMNS, read_id_map(reference / "id_map.csv"))))
    unknown = ~queries["sm_name"].isin(compounds["sm_name"]) | ~queries["cell_type"].isin(CELL_TYPES)
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise UserError(f"{reference / 'id_map.csv'}: row {row}: ({queries['cell_type'][row]!r},"
                        f" {queries['sm_name'][row]!r}) is no cell type x training compound of the world")
    return _Layout(compounds, _train_rows(rng, compounds, with_held_out), queries, genes[:n_genes])


# ----------------------------------------------------------------------------- statistics


def _cell_count_quantiles(params, cell_type, per_quality=16):
    """(cells, scale, probability) at stratified quantiles of `_cell_counts`'s distribution for one cell type."""
    from scipy import stats

    lognormal = np.exp(0.4 * stats.norm.ppf((np.arange(per_quality) + 0.5) / per_quality))
    base = dict(params.median_cells)[cell_type]
    out = []
    for poor, probability in ((False, 1 - params.poor_fraction), (True, params.poor_fraction)):
        factor, scale = (params.poor_cells_factor, params.poor_overdispersion) if poor else (1.0, 1.0)
        out += [(max(3.0, np.round(base * factor * q)), scale, probability / per_quality) for q in lognormal]
    return out


def _effect_oracle(params, effect, frame, layout):
    """Per row, E[y | the row's effect e] over its cell type's cell counts and quality (see the module doc)."""
    cell_rows = np.array([CELL_TYPES.index(c) for c in frame.cell_type])
    compound_rows = pd.Index(layout.compounds.sm_name).get_indexer(frame.sm_name)
    e = effect(cell_rows, compound_rows)
    out = np.zeros(e.shape)
    for cell in np.unique(frame.cell_type):
        rows = (frame.cell_type == cell).to_numpy()
        for cells, scale, probability in _cell_count_quantiles(params, cell):
            out[rows] += probability * expected_signed_log10_p(e[rows] * np.sqrt(cells / 100.0), scale)
    return out.astype(np.float32)


def _cell_counts(rng, params, cell_types):
    """Pseudo-bulk cell counts and noise scales; about a third of rows are poor quality."""
    median = dict(params.median_cells)
    base = np.array([median[c] for c in cell_types], np.float64)
    poor = rng.random(len(cell_types)) < params.poor_fraction
    factor = np.where(poor, params.poor_cells_factor, 1.0)
    cells = np.maximum(3.0, np.round(base * factor * rng.lognormal(0.0, 0.4, len(cell_types))))
    scale = np.where(poor, params.poor_overdispersion, 1.0)
    return cells, scale


def _effects(rng, params, layout):
    """Noise-free effects e[(cell, compound), gene] for every cell type x compound pair."""
    n_genes, rank = len(layout.genes), params.rank
    chem_bits = morgan_bits(layout.compounds.SMILES, params.morgan_radius, params.morgan_bits)
    chem = chem_bits @ rng.standard_normal((chem_bits.shape[1], rank + 1))
    chem = (chem - chem.mean(0)) / chem.std(0)
    own = rng.standard_normal(chem.shape)
    latent = np.sqrt(params.chem_share) * chem + np.sqrt(1 - params.chem_share) * own
    z, potency_draw = latent[:, :rank], latent[:, rank]
    z[:, 0] += params.common_response
    potency = params.potency_median * np.exp(params.potency_sigma * potency_draw)
    control = layout.compounds.control.to_numpy()
    potency[control] = np.quantile(potency, params.control_potency_quantile) * (1 + 0.5 * rng.random(control.sum()))

    shared = rng.standard_normal(rank)
    sharing = np.array([params.held_out_sharing if c in HELD_OUT_CELLS else params.t_cell_sharing for c in CELL_TYPES])
    cells = np.sqrt(sharing)[:, None] * shared + np.sqrt(1 - sharing)[:, None] * rng.standard_normal((len(CELL_TYPES), rank))
    # every cell type shows the common response with the same sign, differing only in strength
    cells[:, 0] = rng.lognormal(0.0, params.common_response_spread, len(CELL_TYPES))

    mask = rng.random((rank, n_genes)) < params.loading_density
    gene_scale = rng.lognormal(0.0, params.gene_scale_sigma, n_genes)
    loadings = rng.standard_normal((rank, n_genes)) * mask * gene_scale / np.sqrt(rank * params.loading_density)
    off_target = (rng.random((len(potency), n_genes)) < params.off_target_density) * rng.normal(
        0.0, params.off_target_scale, (len(potency), n_genes)) * gene_scale

    def effect(cell_rows, compound_rows):
        h = z[compound_rows] * cells[cell_rows]
        raw = potency[compound_rows, None] * (h @ loadings + off_target[compound_rows])
        return params.effect_cap * np.tanh(raw / params.effect_cap)

    return effect


def _observe(rng, params, effect, frame, layout):
    """Draw (t-statistic means, noise scale) for `frame`'s rows, then one noisy observation of each."""
    cell_rows = np.array([CELL_TYPES.index(c) for c in frame.cell_type])
    compound_rows = pd.Index(layout.compounds.sm_name).get_indexer(frame.sm_name)
    cells, scale = _cell_counts(rng, params, frame.cell_type)
    mean = effect(cell_rows, compound_rows) * np.sqrt(cells / 100.0)[:, None]
    observed = signed_log10_p(mean + scale[:, None] * rng.standard_normal(mean.shape))
    return mean, scale, observed.astype(np.float32)


def _oracle(mean, scale):
    """Bayes-optimal prediction per row: E[y] given the row's t mean and its noise scale."""
    out = np.empty(mean.shape, np.float32)
    for s in np.unique(scale):
        rows = scale == s
        out[rows] = expected_signed_log10_p(mean[rows], s)
    return out


# ----------------------------------------------------------------------------- writing


def _write_parquet(path, columns, genes, values):
    arrays = [pa.array(v) for v in columns.values()] + [pa.array(values[:, j]) for j in range(len(genes))]
    table = pa.Table.from_arrays(arrays, names=[*columns, *genes])
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, use_dictionary=False, write_statistics=False)  # 2x faster with 18k columns


def make_world(out_dir, *, genes=18211, seed=0, reference=None, params=None) -> Path:
    """Write de_train.parquet, id_map.csv, hidden/{truth,oracle,effect_oracle}.parquet and world.json
    to out_dir, a new or empty folder. All or nothing: the world is built in a hidden folder beside
    it and renamed into place, so an interrupted run, or a world of other settings already there,
    never leaves files of two worlds under one name."""
    if not 1 <= genes <= MAX_SYNTH_GENES:
        raise UserError(f"--genes must be in [1, {MAX_SYNTH_GENES}], got {genes}")
    if seed < 0:
        raise UserError(f"--seed must be non-negative, got {seed}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not an empty folder; write the world to a new one")
    build = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        _write_world(build, genes, seed, reference, params or Params())
        os.chmod(build, default_mode(directory=True))  # mkdtemp's 0700 would hide the world from other users
        os.replace(build, out_dir)  # onto an empty folder too (POSIX rename)
    except OSError as err:
        raise UserError(f"{out_dir}: cannot write ({err.strerror or err})") from None
    finally:
        if build is not None:
            shutil.rmtree(build, ignore_errors=True)
    return out_dir


def _write_world(out_dir, genes, seed, reference, params):
    rng = np.random.default_rng(seed)
    layout = _reference_layout(rng, reference, genes) if reference else _synthetic_layout(rng, genes)
    effect = _effects(rng, params, layout)
    _, _, train_values = _observe(rng, params, effect, layout.train, layout)
    query_mean, query_scale, truth = _observe(rng, params, effect, layout.queries, layout)

    out_dir = Path(out_dir)
    meta = layout.compounds.set_index("sm_name").loc[layout.train.sm_name]
    train_columns = {
        "cell_type": layout.train.cell_type.to_numpy(),
        "sm_name": layout.train.sm_name.to_numpy(),
        "sm_lincs_id": meta.sm_lincs_id.to_numpy(),
        "SMILES": meta.SMILES.to_numpy(),
        "control": meta.control.to_numpy(bool),
    }
    _write_parquet(out_dir / "de_train.parquet", train_columns, layout.genes, train_values)
    with atomic_path(out_dir / "id_map.csv") as tmp:
        layout.queries.to_csv(tmp, index=False)
    ids = {"id": layout.queries.id.to_numpy()}
    _write_parquet(out_dir / "hidden" / "truth.parquet", ids, layout.genes, truth)
    _write_parquet(out_dir / "hidden" / "oracle.parquet", ids, layout.genes, _oracle(query_mean, query_scale))
    effect_oracle = _effect_oracle(params, effect, layout.queries, layout)
    _write_parquet(out_dir / "hidden" / "effect_oracle.parquet", ids, layout.genes, effect_oracle)
    world = {
        "version": VERSION,
        "seed": seed,
        "genes": genes,
        "reference": str(reference) if reference else None,
        "params": dataclasses.asdict(params),
        "layout": {
            "train_rows": layout.train.cell_type.value_counts().sort_index().to_dict(),
            "id_map_rows": layout.queries.cell_type.value_counts().sort_index().to_dict(),
            "compounds": len(layout.compounds),
        },
        "oracle": "E[y | t mean, noise scale] by 160-node Gauss-Hermite, tabulated every 0.005, interpolated",
        "effect_oracle": "E[y | effect], averaged over 32 stratified quantiles of the cell type's cell counts",
    }
    write_text(out_dir / "world.json", json.dumps(world, indent=2) + "\n")


def default_world(genes=18211, seed=0) -> Path:
    """The cached world for (genes, seed) under $SCP_JAX_CACHE (default ~/.cache/scp_jax).

    Built once in a temporary folder and renamed into place, so concurrent callers never see a
    half-written world; a world from another generator version is rebuilt, and one a concurrent
    caller installed while this one was building is kept.
    """
    root = Path(os.environ.get("SCP_JAX_CACHE") or Path.home() / ".cache" / "scp_jax") / "worlds"
    world = root / f"synth-g{genes}-s{seed}"
    if _world_version(world) == VERSION:
        return world
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{world.name}.", dir=root))
    build = stage / "world"
    try:
        make_world(build, genes=genes, seed=seed)
        if _world_version(world) == VERSION:  # a concurrent caller installed it meanwhile: keep theirs
            return world
        if world.exists():  # stale version: move it aside first, rename cannot replace a folder
            stale = Path(tempfile.mkdtemp(prefix=f".{world.name}.stale.", dir=root))
            os.replace(world, stale / "world")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(build, world)
    except OSError:
        if _world_version(world) != VERSION:  # not a concurrent builder winning the race
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return world


def _world_version(world):
    try:
        return json.loads((world / "world.json").read_text()).get("version")
    except (OSError, ValueError):
        return None
