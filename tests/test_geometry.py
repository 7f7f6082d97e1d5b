"""The built-in detector geometry and the sensor_geometry.csv reader."""

import numpy as np
import pytest

from icegrid.geometry import GeometryError, icecube86, read_geometry_csv, write_geometry_csv


def test_icecube86_has_kaggle_numbering_and_spacings():
    geo = icecube86()
    assert geo.n_sensors == 5160
    sid = np.arange(5160)
    assert np.array_equal(geo.string_of(sid), np.repeat(np.arange(1, 87), 60))
    assert np.array_equal(geo.dom_of(sid), np.tile(np.arange(1, 61), 86))
    xyz = geo.xyz.reshape(86, 60, 3)
    # Every string is vertical; main-array DOMs are 17 m apart over about -500..+500 m.
    assert np.ptp(xyz[:, :, 0], axis=1).max() == 0 and np.ptp(xyz[:, :, 1], axis=1).max() == 0
    assert np.allclose(np.diff(xyz[:78, :, 2], axis=1), -17.0)
    assert -510 < xyz[:78, :, 2].min() < -490 and 490 < xyz[:78, :, 2].max() < 510
    # Nearest neighbour distance between main-array strings is the 125 m grid spacing.
    xy = xyz[:78, 0, :2]
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(78) * 1e9
    assert np.allclose(dist.min(axis=1), 125.0)
    # DeepCore: 8 strings close to the centre, 7 m spacing in the deep part.
    dc = xyz[78:, 0, :2]
    assert np.linalg.norm(dc, axis=1).max() < 100
    assert np.allclose(np.diff(xyz[78:, 10:, 2], axis=1), -7.0)


def test_geometry_csv_round_trip(tmp_path):
    geo = icecube86()
    path = tmp_path / "sensor_geometry.csv"
    write_geometry_csv(geo, path)
    assert path.read_text().splitlines()[0].replace('"', "") == "sensor_id,x,y,z"
    back = read_geometry_csv(path)
    assert np.array_equal(back.xyz, geo.xyz)


def test_geometry_csv_errors_name_the_file(tmp_path):
    path = tmp_path / "sensor_geometry.csv"
    path.write_text("sensor_id,x,y\n0,1,2\n")
    with pytest.raises(GeometryError, match=r"sensor_geometry.csv: missing column\(s\) z"):
        read_geometry_csv(path)
    path.write_text("sensor_id,x,y,z\n0,1,2,3\n5,1,2,3\n")
    with pytest.raises(GeometryError, match="sensor_geometry.csv: 5158 of the 5160 sensors missing"):
        read_geometry_csv(path)
    path.write_text("sensor_id,x,y,z\n0,1,2,3\n0,1,2,3\n")
    with pytest.raises(GeometryError, match="sensor_id must be 0..5159 with each id once .*sensor_id 0 is"):
        read_geometry_csv(path)
