"""Result records (``hrsa analyze`` runs): listed, created once, read back and deleted through the store's methods."""

from __future__ import annotations

import numpy as np
import pytest

from hrsa.store import ActivationStore, InvalidIdError, StoreReadOnlyError, UserError


def test_a_new_store_has_no_results(store: ActivationStore) -> None:
    assert store.results_ids() == []


def test_create_read_and_delete_a_record(filled_store: ActivationStore) -> None:
    store = filled_store
    record = store.create_results("run-b")
    record.create_array("cka/diagonal", data=np.arange(3.0))
    record.attrs["hrsa"] = {"run_id": "run-b"}
    store.create_results("run-a")
    assert store.results_ids() == ["run-a", "run-b"]  # sorted; an empty record (a run that stopped) counts too
    again = ActivationStore.open(store.url)
    np.testing.assert_array_equal(again.results_record("run-b")["cka/diagonal"][:], [0.0, 1.0, 2.0])
    assert again.results_record("run-b").attrs["hrsa"] == {"run_id": "run-b"}
    store.delete_results("run-b")
    assert store.results_ids() == ["run-a"] and store.models() == ["m"]  # nothing else is touched


def test_a_taken_id_is_refused_and_the_record_kept(store: ActivationStore) -> None:
    store.create_results("run").attrs["hrsa"] = {"n": 1}
    with pytest.raises(UserError, match="Expected a new run id. Got 'run'") as error:
        store.create_results("run")
    assert "\n" not in str(error.value)
    assert store.results_record("run").attrs["hrsa"] == {"n": 1}


@pytest.mark.parametrize("method", ["results_record", "delete_results"])
def test_an_unknown_record_names_the_known_ones(store: ActivationStore, method: str) -> None:
    store.create_results("kept")
    with pytest.raises(UserError, match=r"Expected a result record of this store \(kept\). Got 'gone' instead."):
        getattr(store, method)("gone")


@pytest.mark.parametrize("method", ["create_results", "results_record", "delete_results"])
def test_an_unsafe_id_is_refused(store: ActivationStore, method: str) -> None:
    with pytest.raises(InvalidIdError):
        getattr(store, method)("../escape")


def test_a_read_only_store_writes_no_record(store: ActivationStore) -> None:
    store.create_results("run")
    read_only = ActivationStore.open(store.url, mode="r")
    with pytest.raises(StoreReadOnlyError):
        read_only.create_results("new")
    with pytest.raises(StoreReadOnlyError):
        read_only.delete_results("run")
    assert read_only.results_ids() == ["run"]


def test_a_deletion_cut_short_leaves_no_record_and_its_id_free(filled_store: ActivationStore) -> None:
    """Cut short after its metadata went: what is left of a record (its arrays) is not a record, and a new run of
    that id writes its own record whole, not beside the old arrays (nor refused by them)."""
    from hrsa.store.objects import delete_key

    store = filled_store
    record = store.create_results("run")
    record.create_array("cka/diagonal", data=np.arange(3.0))
    record.create_array("old-only", data=np.arange(2.0))
    record.attrs["hrsa"] = {"run_id": "run"}
    delete_key(store._root.store, "results/run/zarr.json")  # as delete_results does first
    assert store.results_ids() == [] and store.results_documents() == {}
    fresh = store.create_results("run")
    fresh.create_array("cka/diagonal", data=np.arange(4.0))
    fresh.attrs["hrsa"] = {"run_id": "run", "new": True}
    again = ActivationStore.open(store.url)
    assert "old-only" not in again.results_record("run")
    np.testing.assert_array_equal(again.results_record("run")["cka/diagonal"][:], np.arange(4.0))


def test_writers_racing_for_one_run_id_make_one_record_whose_writer_alone_succeeds(target) -> None:
    """Of writers creating the same record at one moment, exactly one succeeds and the record is its own: Zarr's
    create_group checks, then writes, so two writers both "created" it (10 of 20 trials, two processes) and each wrote
    its arrays and document into the one group, a record whose arrays were one run's under the other's document."""
    import threading

    ids, writers = [f"run-{i}" for i in range(12)], 4
    stores = [target.open(mode="a") for _ in range(writers)]
    meeting, won = threading.Barrier(writers, timeout=60), {}
    lock = threading.Lock()

    def write(w: int) -> None:
        for run_id in ids:
            meeting.wait()
            try:
                record = stores[w].create_results(run_id)
            except UserError:
                continue
            record.attrs["hrsa"] = {"writer": w}
            with lock:
                won.setdefault(run_id, []).append(w)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == sorted(ids) and all(len(w) == 1 for w in won.values()), won
    again = target.open(mode="r")
    assert {i: again.results_record(i).attrs["hrsa"]["writer"] for i in ids} == {i: w[0] for i, w in won.items()}


def test_a_racing_writers_metadata_in_flight_is_not_taken_for_a_leftover(filled_store: ActivationStore) -> None:
    """Zarr's local store writes a record's metadata as zarr.<uuid>.partial, then links it to zarr.json: another
    writer clearing leftovers of that id deleted the temp file, and the first writer's link failed
    (FileNotFoundError in a thread, its record never made; seen once in a clean-clone run of the race test)."""
    from pathlib import Path

    store = filled_store
    store.create_results("other")  # the results group exists
    in_flight = Path(store.url) / "results" / "run" / "zarr.0123abcd.partial"
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"{}")
    store.create_results("run")
    assert in_flight.exists()
