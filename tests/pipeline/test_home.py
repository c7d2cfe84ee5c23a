import pytest

from pipeline.home import Home, UnsafeNameError, check_name


@pytest.mark.parametrize("name", ["../etc", "a/b", "/abs", "", ".hidden", "x" * 200, "a..b", "a\\b", "a b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafeNameError, match="is not allowed"):
        check_name(name)


def test_artifact_dirs_stay_inside_the_home(tmp_path):
    home = Home.from_config(str(tmp_path)).ensure()
    path = home.artifact_dir("dataset", "fleet-lidar", 3)
    assert path == str(tmp_path / "artifacts" / "dataset" / "fleet-lidar" / "v3")
    with pytest.raises(UnsafeNameError):
        home.artifact_dir("dataset", "../../outside", 1)


def test_file_urls_and_remote_roots(tmp_path):
    assert Home.from_config(f"file://{tmp_path}").root == str(tmp_path)
    remote = Home.from_config("memory://bucket/avp")
    assert remote.logs == "memory://bucket/avp/logs"
    with pytest.raises(ValueError, match="set registry_url"):
        remote.registry_url("")
    assert remote.registry_url("postgresql://db/avp") == "postgresql://db/avp"
