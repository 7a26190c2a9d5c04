"""The Blender add-on with the real bpy module and a real backend child process (tiny models)."""

import os
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import edges_watertight, import_bpy, pid_alive  # noqa: E402

bpy = import_bpy()
import addon_utils  # noqa: E402  (ships with bpy)

ADDON = "blender_occnet"


def mesh_arrays(obj):
    me = obj.data
    v = np.empty(len(me.vertices) * 3, np.float32)
    me.vertices.foreach_get("co", v)
    f = np.empty(len(me.loops), np.int32)
    me.loops.foreach_get("vertex_index", f)
    assert all(p.loop_total == 3 for p in me.polygons[:10])
    return v.reshape(-1, 3), f.reshape(-1, 3)


def world_vertices(obj):
    v, _ = mesh_arrays(obj)
    m = np.array(obj.matrix_world)
    return v @ m[:3, :3].T + m[:3, 3]


@pytest.fixture(scope="module")
def addon(tiny_checkpoints):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    mod = addon_utils.enable(ADDON, default_set=True, handle_error=None)
    assert mod is not None, "the add-on failed to enable"
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.checkpoint_points = str(tiny_checkpoints["points"])
    prefs.checkpoint_image = str(tiny_checkpoints["image"])
    prefs.default_resolution = "64"
    prefs.device = "CPU"
    from blender_occnet import runtime
    yield runtime
    client = runtime.session.client
    pid = client.proc.pid if client and client.proc else None
    addon_utils.disable(ADDON, default_set=True)
    if pid is not None:
        assert not pid_alive(pid), "disabling the add-on left the backend running"


@pytest.fixture
def scene(addon):
    """An empty scene for each test (objects removed, no running job)."""
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    for me in list(bpy.data.meshes):
        bpy.data.meshes.remove(me)
    bpy.context.scene.cursor.location = (0, 0, 0)
    assert addon.session.job is None
    yield bpy.context.scene
    if addon.session.job is not None:  # a failed test must not leave the next one busy
        addon.session.shutdown()


def test_register_unregister_cycle(addon):
    assert hasattr(bpy.ops.occnet, "mesh_from_points")
    for name in ("OCCNET_OT_mesh_from_points", "OCCNET_OT_mesh_from_image"):
        cls = getattr(bpy.types, name)
        assert {"REGISTER", "UNDO"} <= set(cls.bl_options)
    assert hasattr(bpy.types, "OCCNET_PT_panel")
    addon_utils.disable(ADDON, default_set=True)
    assert not hasattr(bpy.types, "OCCNET_PT_panel")
    assert not hasattr(bpy.types, "OCCNET_OT_mesh_from_points")
    assert ADDON not in bpy.context.preferences.addons
    mod = addon_utils.enable(ADDON, default_set=True, handle_error=None)
    assert mod is not None and hasattr(bpy.types, "OCCNET_PT_panel")
    # the preferences were reset by the disable: restore them for the other tests
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.default_resolution = "64"
    prefs.device = "CPU"


def _prefs(tiny_checkpoints):
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.checkpoint_points = str(tiny_checkpoints["points"])
    prefs.checkpoint_image = str(tiny_checkpoints["image"])
    prefs.default_resolution = "64"
    prefs.device = "CPU"
    return prefs


def test_mesh_from_selected_objects_world_space_with_modifiers(scene, tiny_checkpoints):
    _prefs(tiny_checkpoints)
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=(5.0, 1.0, -2.0))
    cube = bpy.context.active_object
    cube.scale = (1.0, 2.0, 1.0)
    mod = cube.modifiers.new("Array", "ARRAY")  # doubles the extent along x: 4 x 4 x 2 in world space
    mod.count = 2
    mod.relative_offset_displace = (1.0, 0.0, 0.0)
    bpy.ops.object.pointcloud_random_add(location=(4.0, -3.0, 0.0))  # points in [-1, 1]^3 around it
    pc = bpy.context.active_object
    cube.select_set(True)
    bpy.context.view_layer.update()
    dg = bpy.context.evaluated_depsgraph_get()
    from blender_occnet.gather import object_points
    cube_pts, cube_colours = object_points(cube, dg)
    assert len(cube_pts) == 16 and cube_colours is None  # two cubes: the array modifier was applied
    np.testing.assert_allclose(cube_pts.max(0), [8.0, 3.0, -1.0], atol=1e-5)  # world space
    np.testing.assert_allclose(cube_pts.min(0), [4.0, -1.0, -3.0], atol=1e-5)
    pts = np.concatenate([cube_pts, object_points(pc, dg)[0]])
    lo, hi = pts.min(0), pts.max(0)
    n_before = len(bpy.data.objects)
    names_before = {o.name for o in bpy.data.objects}
    bpy.ops.ed.undo_push(message="before")  # background mode starts without an undo system

    res = bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", source="SELECTED")
    assert res == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj.name.startswith("PointCloud_occnet")
    assert len(bpy.data.objects) == n_before + 1
    assert obj.select_get() and not cube.select_get() and not pc.select_get()
    assert obj.name in bpy.context.view_layer.active_layer_collection.collection.objects
    v, f = mesh_arrays(obj)
    assert len(v) > 100 and edges_watertight(f)
    assert all(p.use_smooth for p in obj.data.polygons[:100])
    center = (lo + hi) / 2
    np.testing.assert_allclose(obj.location, center, atol=1e-4)
    wv = world_vertices(obj)
    scale = (hi - lo).max()
    # the test model's octahedron, cut by the safety net to where the points are: in world space
    # around the points (a result left in object space would sit at the origin, 0.79 scales away);
    # within the padded canonical box, which the refinement's smoothing may cross by a hair
    assert (np.abs(wv - center) <= 0.56 * scale).all()
    assert (np.ptp(wv, axis=0) > 0.4 * (hi - lo)).all()

    # one undo step removes the result and nothing else. Headless Blender does not push undo steps
    # for operators by itself (the UI does, for REGISTER | UNDO operators): push it like the UI.
    bpy.ops.ed.undo_push(message="Mesh from Point Cloud")
    bpy.ops.ed.undo()
    assert len(bpy.data.objects) == n_before
    assert {o.name for o in bpy.data.objects} == names_before
    assert not any(o.name.startswith("PointCloud_occnet") for o in bpy.data.objects)


def test_a_scan_of_vertices_alone_loses_its_stray_points_and_modelled_vertices_keep_theirs(scene, addon,
                                                                                           tiny_checkpoints):
    """A mesh of vertices alone (what Blender's PLY import makes of a scan) is a scan: its flying
    pixels are left out and the report says how many. The same vertices with a face are modelled,
    and all of them count (the cube with an array modifier above loses none of its corners)."""
    _prefs(tiny_checkpoints)
    rng = np.random.default_rng(0)
    d = rng.normal(size=(2000, 3))
    scan = 0.5 * d / np.linalg.norm(d, axis=1, keepdims=True)
    e = rng.normal(size=(10, 3))
    flying = 2.0 * e / np.linalg.norm(e, axis=1, keepdims=True)
    vertices = np.concatenate([scan, flying]).tolist()
    for faces, stray in (([], True), ([(0, 1, 2)], False)):
        for obj in list(bpy.data.objects):
            obj.select_set(False)
        mesh = bpy.data.meshes.new("scan")
        mesh.from_pydata(vertices, [], faces)
        obj = bpy.data.objects.new("scan", mesh)
        scene.collection.objects.link(obj)
        obj.select_set(True)
        bpy.context.view_layer.objects.active = obj
        assert bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32") == {"FINISHED"}
        assert ("left out 10 stray points" in addon.session.last_info) is stray, addon.session.last_info


def test_mesh_from_curve_and_point_file(scene, tiny_checkpoints, tmp_path):
    _prefs(tiny_checkpoints)
    bpy.ops.curve.primitive_bezier_circle_add(radius=3.0, location=(0.0, 0.0, 7.0))
    circle = bpy.context.active_object
    res = bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32")
    assert res == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj.type == "MESH" and obj.name.startswith(circle.name + "_occnet")
    assert abs(obj.location.z - 7.0) < 1e-4

    pts = np.random.default_rng(0).uniform(-1, 1, (500, 3)) + [0.0, 20.0, 0.0]
    path = tmp_path / "cloud.xyz"
    np.savetxt(path, pts)
    res = bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", source="FILE", filepath=str(path),
                                          resolution="32")
    assert res == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj.name.startswith("cloud_occnet")
    np.testing.assert_allclose(obj.location, (pts.min(0) + pts.max(0)) / 2, atol=1e-4)


def test_bad_inputs_are_reported_without_objects(scene, tiny_checkpoints, tmp_path):
    _prefs(tiny_checkpoints)
    n = len(bpy.data.objects)
    with pytest.raises(RuntimeError, match="Select mesh"):
        bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", source="SELECTED")
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"ply\nformat ascii 1.0\nelement face 3\nend_header\n")
    with pytest.raises(RuntimeError, match="vertex"):
        bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", source="FILE", filepath=str(bad))
    with pytest.raises(RuntimeError, match="does not exist"):
        bpy.ops.occnet.mesh_from_image("EXEC_DEFAULT", source="FILE", filepath=str(tmp_path / "nope.png"))
    (tmp_path / "notes.png").write_text("not a picture")  # the backend's reader names the problem
    with pytest.raises(RuntimeError, match="notes.png: cannot read the image: it is not a PNG"):
        bpy.ops.occnet.mesh_from_image("EXEC_DEFAULT", source="FILE", filepath=str(tmp_path / "notes.png"))
    assert len(bpy.data.objects) == n and len(bpy.data.images) == 0


def test_mesh_from_image_datablock_and_file(scene, tiny_checkpoints, tmp_path):
    _prefs(tiny_checkpoints)
    img = bpy.data.images.new("photo", 48, 32, alpha=True)
    px = np.zeros((32, 48, 4), np.float32)
    px[4:28, 8:40] = (0.8, 0.3, 0.2, 1.0)
    img.pixels.foreach_set(px.ravel())
    scene.cursor.location = (1.0, 2.0, 3.0)
    res = bpy.ops.occnet.mesh_from_image("EXEC_DEFAULT", source="IMAGE", image="photo", resolution="32")
    assert res == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj.name.startswith("photo_occnet")
    np.testing.assert_allclose(obj.location, (1.0, 2.0, 3.0), atol=1e-6)
    v, f = mesh_arrays(obj)
    assert edges_watertight(f)
    assert np.abs(v).max() < 0.56  # canonical box around the cursor

    img.filepath_raw = str(tmp_path / "photo.png")
    img.file_format = "PNG"
    img.save()
    n_images = len(bpy.data.images)
    res = bpy.ops.occnet.mesh_from_image("EXEC_DEFAULT", source="FILE",
                                         filepath=str(tmp_path / "photo.png"), resolution="32")
    assert res == {"FINISHED"}
    assert len(bpy.data.images) == n_images  # the file was read without leaving a datablock


def test_mesh_from_image_stands_on_the_cursor_as_seen_from_the_front(scene, solid_pixel_checkpoint):
    """docs/CONTRACTS.md: a viewer-centred result rests on the ground at the 3D cursor and the
    Front view (numpad 1: x right, z up) shows the picture upright. The picture is an L whose foot
    points right; the solid test model extrudes it, so the foot must come back at +x, low z."""
    prefs = bpy.context.preferences.addons[ADDON].preferences
    previous = prefs.checkpoint_image
    prefs.checkpoint_image = solid_pixel_checkpoint
    try:
        img = bpy.data.images.new("ell", 100, 100, alpha=True)
        px = np.zeros((100, 100, 4), np.float32)         # Blender's rows run bottom to top
        px[20:80, 30:45] = (0.2, 0.4, 0.8, 1.0)           # the bar
        px[20:35, 30:75] = (0.2, 0.4, 0.8, 1.0)           # the foot, at the bottom, to the right
        img.pixels.foreach_set(px.ravel())
        scene.cursor.location = (1.0, 2.0, 3.0)
        res = bpy.ops.occnet.mesh_from_image("EXEC_DEFAULT", source="IMAGE", image="ell", resolution="32")
        assert res == {"FINISHED"}
        obj = bpy.context.active_object
        v = world_vertices(obj)
        colours = obj.data.color_attributes["Color"]
        rgba = np.empty(len(colours.data) * 4, np.float32)
        colours.data.foreach_get("color_srgb", rgba)
    finally:
        prefs.checkpoint_image = previous
    # the picture's own colour on every vertex, shown by the object's material
    np.testing.assert_allclose(rgba.reshape(-1, 4)[:, :3], np.tile((0.2, 0.4, 0.8), (len(v), 1)), atol=0.01)
    assert obj.active_material is not None
    assert v[:, 2].min() == pytest.approx(3.0, abs=1e-4), "rests on the cursor's height"
    assert (v[:, 0].min() + v[:, 0].max()) / 2 == pytest.approx(1.0, abs=1e-4)
    assert (v[:, 1].min() + v[:, 1].max()) / 2 == pytest.approx(2.0, abs=1e-4)
    height = v[:, 2].max() - 3.0
    top, bottom = v[v[:, 2] > 3.0 + 0.6 * height], v[v[:, 2] < 3.0 + 0.2 * height]
    assert bottom[:, 0].max() > top[:, 0].max() + 0.2, "the foot points right in the Front view"


def test_a_mask_datablock_is_law_for_an_opaque_picture(scene, solid_pixel_checkpoint):
    """The Mask field: an opaque picture with nothing to tell the object from, and a white-on-black
    mask of an L at half the picture's size; the solid test model extrudes the mask, so the L's
    foot comes back at +x, low z, and the result is twice as tall as its bar is wide."""
    prefs = bpy.context.preferences.addons[ADDON].preferences
    previous = prefs.checkpoint_image
    prefs.checkpoint_image = solid_pixel_checkpoint
    try:
        img = bpy.data.images.new("flat", 100, 100, alpha=False)
        img.pixels.foreach_set(np.full(100 * 100 * 4, 0.5, np.float32))
        mask = bpy.data.images.new("ell_mask", 50, 50, alpha=False)
        px = np.zeros((50, 50, 4), np.float32)
        px[..., 3] = 1.0
        px[10:40, 15:22, :3] = 1.0                         # the bar (Blender's rows run bottom to top)
        px[10:17, 15:37, :3] = 1.0                         # the foot, at the bottom, to the right
        mask.pixels.foreach_set(px.ravel())
        res = bpy.ops.occnet.mesh_from_image("EXEC_DEFAULT", source="IMAGE", image="flat", mask="ell_mask",
                                             focal_length=35.0, resolution="32")
        assert res == {"FINISHED"}
        v = world_vertices(bpy.context.active_object)
        with pytest.raises(RuntimeError, match="no image named 'missing'"):
            bpy.ops.occnet.mesh_from_image("EXEC_DEFAULT", source="IMAGE", image="flat", mask="missing")
    finally:
        prefs.checkpoint_image = previous
    height = np.ptp(v[:, 2])
    top, bottom = v[v[:, 2] > v[:, 2].min() + 0.6 * height], v[v[:, 2] < v[:, 2].min() + 0.2 * height]
    assert bottom[:, 0].max() > top[:, 0].max() + 0.2, "the foot points right in the Front view"
    assert np.ptp(top[:, 0]) < 0.5 * height, "only the mask's bar, not the whole opaque picture"



def test_the_backends_warnings_reach_the_user(scene, addon, solid_pixel_checkpoint):
    """An opaque picture without a mask: the backend estimates the object's mask and says so; the
    add-on shows it in the panel's message and reports it as a warning, not as plain info."""
    prefs = bpy.context.preferences.addons[ADDON].preferences
    previous = prefs.checkpoint_image
    prefs.checkpoint_image = solid_pixel_checkpoint
    try:
        img = bpy.data.images.new("plain", 100, 100, alpha=False)
        px = np.full((100, 100, 4), 0.9, np.float32)
        px[..., 3] = 1.0                                     # opaque: no alpha to take the mask from
        px[30:70, 40:60, :3] = (0.8, 0.2, 0.1)               # a red bar on a light grey backdrop
        img.pixels.foreach_set(px.ravel())
        assert bpy.ops.occnet.mesh_from_image("EXEC_DEFAULT", source="IMAGE", image="plain",
                                              resolution="32") == {"FINISHED"}
    finally:
        prefs.checkpoint_image = previous
    summary, *warnings = addon.session.last_info.split("\n")
    assert summary.startswith("plain_occnet")
    assert any(w.startswith("Warning: ") and "mask was estimated" in w for w in warnings), addon.session.last_info


def _busy_job(ops, resolution=256):
    pts = np.random.default_rng(7).normal(size=(400, 3)).astype(np.float32)
    from blender_occnet import request_options
    opts = request_options.make_options(resolution=resolution, device="cpu",
                             checkpoint=bpy.context.preferences.addons[ADDON].preferences.checkpoint_points)
    return ops.start_job(bpy.context, "points", pts, opts, "busy", origin=np.zeros(3), label="test")


def _pump_until(ops, cond, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        ops.session.pump()
        time.sleep(0.01)


def test_cancel_while_busy_greys_out_generate(scene, addon, tiny_checkpoints):
    ops = addon
    _prefs(tiny_checkpoints)
    n = len(bpy.data.objects)
    job = _busy_job(ops)
    assert not bpy.ops.occnet.mesh_from_points.poll()  # greyed out while busy
    assert not bpy.ops.occnet.mesh_from_image.poll()
    assert bpy.ops.occnet.cancel.poll()
    _pump_until(ops, lambda: job.request.stage == "extract")
    t0 = time.monotonic()
    bpy.ops.occnet.cancel()
    _pump_until(ops, lambda: job.request.done, timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, f"cancel took {elapsed:.2f} s"  # a full run takes several seconds
    outcome = ops.session.finish_job(bpy.context)
    assert outcome.obj is None and outcome.cancelled
    assert len(bpy.data.objects) == n and "busy" not in bpy.data.meshes
    assert bpy.ops.occnet.mesh_from_points.poll() and not bpy.ops.occnet.cancel.poll()


def test_backend_killed_mid_request_then_recovers(scene, addon, tiny_checkpoints):
    ops = addon
    _prefs(tiny_checkpoints)
    bpy.ops.mesh.primitive_ico_sphere_add(location=(0.0, 0.0, 2.0))
    sphere = bpy.context.active_object
    n = len(bpy.data.objects)
    job = _busy_job(ops)
    old_pid = ops.session.client.proc.pid
    _pump_until(ops, lambda: job.request.stage == "extract")
    os.kill(old_pid, 9)
    _pump_until(ops, lambda: job.request.done, timeout=10)
    outcome = ops.session.finish_job(bpy.context)
    assert outcome.obj is None
    assert "killed by signal 9" in outcome.error and "backend_exited" in outcome.error
    assert "killed" in ops.session.last_error
    assert len(bpy.data.objects) == n
    assert not pid_alive(old_pid)
    # the next request starts a fresh backend
    sphere.select_set(True)
    bpy.context.view_layer.objects.active = sphere
    assert bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32") == {"FINISHED"}
    assert ops.session.client.proc.pid != old_pid
    assert ops.session.last_error == ""


def test_killed_during_exec_reports_error(scene, addon, tiny_checkpoints):
    """EXEC path (scripts, background): the operator fails with the reason, no half-built object."""
    ops = addon
    cl = ops.client_for(_prefs(tiny_checkpoints))
    bpy.ops.mesh.primitive_monkey_add()
    cl.start()
    pid = cl.proc.pid
    n = len(bpy.data.objects)

    def killer():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            job = ops.session.job
            if job is not None and job.request.stage == "extract":
                os.kill(pid, 9)
                return
            time.sleep(0.01)

    t = threading.Thread(target=killer)
    t.start()
    with pytest.raises(RuntimeError, match="killed"):
        bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="256")
    t.join()
    assert len(bpy.data.objects) == n and ops.session.job is None


def test_malformed_frame_does_not_break_the_addon(scene, addon, tiny_checkpoints):
    ops = addon
    cl = ops.client_for(_prefs(tiny_checkpoints))
    cl.start()
    pid = cl.proc.pid
    cl.send_raw(struct.pack("<4sIQ", b"OCNF", 5, 0) + b"{oops")
    _pump_until(ops, lambda: any(e.get("code") == "protocol_error" for e in cl.take_unattributed_errors()))
    bpy.ops.mesh.primitive_cube_add()
    assert bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32") == {"FINISHED"}
    assert cl.proc.pid == pid  # same backend, still serving


def test_bad_checkpoint_reported(scene, addon, tiny_checkpoints, tmp_path):
    _prefs(tiny_checkpoints)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\0" * 64)
    bpy.ops.mesh.primitive_cube_add()
    with pytest.raises(RuntimeError, match="bad.safetensors"):
        bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", checkpoint=str(bad))
    assert "bad_checkpoint" in addon.session.last_error
    assert len(bpy.data.objects) == 1


def test_check_and_setup_environment(addon, tmp_path):
    prefs = bpy.context.preferences.addons[ADDON].preferences
    assert bpy.ops.occnet.detect_python() == {"FINISHED"}
    assert os.path.isfile(prefs.python_path)
    assert bpy.ops.occnet.check_python() == {"FINISHED"}
    from blender_occnet import preferences, setup_env
    res = preferences.check_state["result"]
    assert res.ok and res.versions["torch"].startswith("2.") and res.device == "cpu"

    prefs.python_path = str(tmp_path / "no-such-python")
    with pytest.raises(RuntimeError, match="does not exist"):
        bpy.ops.occnet.check_python()

    # a venv that reuses this interpreter's packages (no download in tests)
    target = tmp_path / "venv"
    res = bpy.ops.occnet.setup_environment(base_python=sys.executable, target=str(target),
                                           install_packages=False, system_site_packages=True)
    assert res == {"FINISHED"}, preferences._setup["progress"].lines
    assert prefs.python_path == setup_env.venv_python(str(target))
    wm = bpy.context.window_manager  # the main thread's copy of the worker's progress
    assert wm.occnet_setup_status == "Ready" and wm.occnet_setup_progress == 1.0
    cp = subprocess.run([prefs.python_path, "-c", "import sys; print(sys.prefix)"],
                        capture_output=True, text=True, check=True)
    assert cp.stdout.strip() == str(target)

    # the preferences show the progress, what a download would cost, and the check's versions
    preferences.check_state.update(checking="", result=preferences.interpreter.known(prefs.python_path))
    log = []
    preferences.OCCNET_AP_preferences.draw(type("P", (), {"layout": _Recorder(log)})(), bpy.context)
    bars = [kw for name, _, kw in log if name == "progress"]
    assert bars and bars[0]["text"] == "Ready" and bars[0]["factor"] == 1.0
    labels = " | ".join(kw.get("text", "") for name, _, kw in log if name == "label")
    assert "PyTorch for the CPU" in labels and "about 200 MB" in labels  # no NVIDIA GPU here
    assert "torch 2." in labels and "batch_launcher.py" in labels
    assert "about 200 MB" in preferences.OCCNET_OT_setup_environment.description(bpy.context, None)
    prefs.python_path = ""


def test_mesh_builder_colors_normals_and_refusals(addon):
    from blender_occnet import mesh_builder
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
    colors = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 1, 0.5]], np.float32)
    normals = verts - verts.mean(0)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    me = mesh_builder.build_mesh("tet", verts, faces, normals=normals, colors=colors,
                                 use_custom_normals=True)
    try:
        assert len(me.vertices) == 4 and len(me.polygons) == 4 and len(me.edges) == 6
        attr = me.color_attributes["Color"]
        assert attr.domain == "POINT" and attr.data_type == "FLOAT_COLOR"
        got = np.empty(16, np.float32)
        attr.data.foreach_get("color_srgb", got)  # colours from files and the backend are sRGB
        np.testing.assert_allclose(got.reshape(4, 4), colors, atol=1e-4)
        assert me.has_custom_normals
        corner = np.empty(len(me.loops) * 3, np.float32)
        me.corner_normals.foreach_get("vector", corner)
        vi = np.empty(len(me.loops), np.int32)
        me.loops.foreach_get("vertex_index", vi)
        np.testing.assert_allclose(corner.reshape(-1, 3), normals[vi], atol=1e-3)
    finally:
        bpy.data.meshes.remove(me)

    n_meshes = len(bpy.data.meshes)
    with pytest.raises(mesh_builder.MeshDataError, match="range over"):
        mesh_builder.build_mesh("bad", verts, faces + 1)
    with pytest.raises(mesh_builder.MeshDataError, match="empty"):
        mesh_builder.build_mesh("bad", verts, np.zeros((0, 3), np.int32))
    with pytest.raises(mesh_builder.MeshDataError, match="NaN"):
        mesh_builder.build_mesh("bad", verts * np.nan, faces)
    assert len(bpy.data.meshes) == n_meshes  # nothing half-built is left behind


def test_network_normals_option(scene, addon, tiny_checkpoints):
    prefs = _prefs(tiny_checkpoints)
    prefs.use_normals = True
    try:
        bpy.ops.mesh.primitive_cube_add()
        assert bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32") == {"FINISHED"}
        me = bpy.context.active_object.data
        assert me.has_custom_normals
        # octahedron faces: normals are (+-1, +-1, +-1) / sqrt(3)
        n = np.empty(len(me.loops) * 3, np.float32)
        me.corner_normals.foreach_get("vector", n)
        np.testing.assert_allclose(np.abs(n.reshape(-1, 3)).mean(0), [3 ** -0.5] * 3, atol=0.05)
    finally:
        prefs.use_normals = False


def test_refine_preference_reaches_the_backend(scene, addon, tiny_checkpoints):
    """The test model is an exact octahedron; the selected object's vertices (dense points on a
    slightly larger octahedron) pull the refined surface outwards, unless refinement is off."""
    prefs = _prefs(tiny_checkpoints)
    rng = np.random.default_rng(0)
    p = rng.exponential(size=(3000, 3)) * rng.choice([-1.0, 1.0], size=(3000, 3))
    p = p / np.abs(p).sum(axis=1, keepdims=True)
    me = bpy.data.meshes.new("scan")
    me.from_pydata(p.tolist(), [], [])
    bpy.context.collection.objects.link(obj := bpy.data.objects.new("scan", me))
    spreads = {}
    try:
        for refine in (False, True):
            prefs.refine_points = refine
            for o in bpy.context.selected_objects:
                o.select_set(False)
            obj.select_set(True)
            bpy.context.view_layer.objects.active = obj
            assert bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32") == {"FINISHED"}
            result = bpy.context.active_object
            v = np.empty(len(result.data.vertices) * 3, np.float32)
            result.data.vertices.foreach_get("co", v)
            world = np.asarray(result.matrix_world)
            v = v.reshape(-1, 3) @ world[:3, :3].T + world[:3, 3]
            spreads[refine] = np.abs(v).sum(axis=1).mean()  # the octahedron's "radius"
    finally:
        prefs.refine_points = True
    # The scan's canonical box has edge 2, so the network's octahedron 0.4 lands at 0.8; the scan is at 1.
    assert abs(spreads[False] - 0.8) < 0.03 and abs(spreads[True] - 1.0) < 0.03, spreads


class _Recorder:
    """Stands in for a UILayout: records every call, accepts attribute assignments."""

    def __init__(self, log):
        self.__dict__["_log"] = log

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self._log.append((name, args, kwargs))
            return _Recorder(self._log)
        return call

    def __setattr__(self, name, value):
        self._log.append(("set", (name, value), {}))


def test_panel_draws_progress_while_busy_and_errors(scene, addon, tiny_checkpoints):
    from blender_occnet.panel import OCCNET_PT_panel
    ops = addon
    _prefs(tiny_checkpoints)

    def draw():
        log = []
        fake = type("P", (), {"layout": _Recorder(log)})()
        OCCNET_PT_panel.draw(fake, bpy.context)
        return log

    idle = draw()
    assert not any(name == "progress" for name, _, _ in idle)
    assert ("set", ("source", "SELECTED"), {}) in idle
    job = _busy_job(ops)
    try:
        _pump_until(ops, lambda: job.request.stage == "extract")
        busy = draw()
        prog = [kw for name, _, kw in busy if name == "progress"]
        assert prog and 0.0 <= prog[0]["factor"] <= 1.0 and "extract" in prog[0]["text"]
        assert any(name == "operator" and args[0] == "occnet.cancel" for name, args, _ in busy)
    finally:
        bpy.ops.occnet.cancel()
        _pump_until(ops, lambda: job.request.done)
        ops.session.finish_job(bpy.context)
    ops.session.last_error = "the backend was killed by signal 9 during the request. [backend_exited]"
    err = draw()
    labels = " ".join(kw.get("text", "") for name, _, kw in err if name == "label")
    assert "killed by signal 9" in labels
    ops.session.last_error = ""


def test_modal_path_pumps_and_builds_one_object(scene, addon, tiny_checkpoints):
    """The UI path: invoke starts the job, a timer event calls modal() which pumps frames and
    finally builds the object. Headless Blender cannot invoke, so drive modal() directly."""
    from types import SimpleNamespace
    ops = addon
    _prefs(tiny_checkpoints)
    reports = []

    from blender_occnet.operators import _Generate

    class FakeOp(_Generate):
        def report(self, kind, msg):
            reports.append((kind, msg))

    # a scan of the test model's octahedron (nothing for the backend to warn about: plain INFO)
    directions = np.random.default_rng(9).exponential(size=(1000, 3)) * \
        np.random.default_rng(10).choice([-1.0, 1.0], size=(1000, 3))
    pts = (directions / np.abs(directions).sum(axis=1, keepdims=True) * 0.5).astype(np.float32) + [0.0, 0.0, 4.0]
    from blender_occnet import request_options
    opts = request_options.make_options(resolution=64, checkpoint=str(tiny_checkpoints["points"]))
    ops.start_job(bpy.context, "points", pts, opts, "modal_test",
                  origin=(pts.min(0) + pts.max(0)) / 2, label="Mesh from Point Cloud")
    op = FakeOp()
    n = len(bpy.data.objects)
    ticks = 0
    while True:
        assert ops.session.busy
        assert op.modal(bpy.context, SimpleNamespace(type="MOUSEMOVE")) == {"PASS_THROUGH"}
        res = op.modal(bpy.context, SimpleNamespace(type="TIMER"))
        ticks += 1
        if res != {"PASS_THROUGH"}:
            break
        time.sleep(0.02)
        assert ticks < 3000
    assert res == {"FINISHED"}, reports
    assert len(bpy.data.objects) == n + 1 and bpy.context.active_object.name == "modal_test"
    assert not ops.session.busy and reports[-1][0] == {"INFO"}


def test_image_pixels_orientation_and_colour(addon):
    from blender_occnet import gather as ops
    img = bpy.data.images.new("orient", 4, 3, alpha=True)
    px = np.zeros((3, 4, 4), np.float32)  # Blender rows: 0 = bottom
    px[0, :, :] = (1.0, 0.0, 0.0, 1.0)  # bottom row red
    px[2, :, :] = (0.0, 0.0, 1.0, 0.5)  # top row blue, half transparent
    img.pixels.foreach_set(px.ravel())
    try:
        out = ops.image_pixels(img)
        assert out.dtype == np.uint8 and out.shape == (3, 4, 4)
        assert tuple(out[0, 0]) == (0, 0, 255, 128)  # row 0 = top
        assert tuple(out[2, 0]) == (255, 0, 0, 255)
    finally:
        bpy.data.images.remove(img)
    img = bpy.data.images.new("linear", 2, 2, alpha=True, float_buffer=True)
    img.pixels.foreach_set(np.full(16, 0.2140411, np.float32))  # linear 0.214 = sRGB 0.5
    try:
        out = ops.image_pixels(img)
        assert abs(int(out[0, 0, 0]) - 128) <= 1 and abs(int(out[0, 0, 3]) - 55) <= 1
    finally:
        bpy.data.images.remove(img)


def test_prestart_starts_backend_with_preloaded_models(scene, addon, tiny_checkpoints):
    """What the UI's start-up timer does (timers never fire headless: call it directly)."""
    ops = addon
    prefs = _prefs(tiny_checkpoints)
    ops.session.shutdown()
    prefs.start_with_blender = False
    assert ops.prestart_timer() is None and ops.session.client is None
    prefs.start_with_blender = True
    prefs.python_path = sys.executable
    try:
        ops._prestart_deadline[0] = time.monotonic() + 60
        while ops.prestart_timer() is not None:  # waits for the interpreter check
            time.sleep(0.1)
        cl = ops.session.client
        assert cl is not None and cl.alive
        assert cl.args == ["--preload", f"points:{prefs.checkpoint_points}",
                           "--preload", f"image:{prefs.checkpoint_image}"]
        deadline = time.monotonic() + 60
        while not any(m["checkpoint"].endswith("octa_points.safetensors")
                      for m in cl.info()["loaded_models"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        bpy.ops.mesh.primitive_cube_add()
        assert bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32") == {"FINISHED"}
        assert ops.prestart_timer() is None and ops.session.client is cl  # started once
    finally:
        prefs.python_path = ""
        prefs.start_with_blender = True


# -- the boundary between Blender and the backend (issue #9) --------------------------------

def test_register_refuses_blender_below_the_minimum(addon, monkeypatch):
    import blender_occnet
    registered = list(blender_occnet._registered)
    monkeypatch.setattr(blender_occnet, "_blender_version", lambda: (3, 6, 5))
    with pytest.raises(RuntimeError, match=r"needs Blender 4\.2 or newer; this is Blender 3\.6\.5"):
        blender_occnet.register()
    assert blender_occnet._registered == registered  # nothing registered twice or half


def test_only_valid_request_options_can_be_chosen(scene, addon, tiny_checkpoints):
    prefs = _prefs(tiny_checkpoints)
    from blender_occnet import request_options
    items = [i.identifier for i in prefs.bl_rna.properties["default_resolution"].enum_items]
    assert items == [str(r) for r in request_options.RESOLUTIONS]
    with pytest.raises(TypeError):
        prefs.default_resolution = "100"
    prefs.threshold = 1.0
    assert prefs.threshold == pytest.approx(request_options.THRESHOLD_MAX)
    prefs.threshold = 0.5
    prefs.max_faces = 2  # a closed mesh needs 4 faces
    assert prefs.max_faces == request_options.MIN_FACE_BUDGET
    prefs.max_faces = 0
    bpy.ops.mesh.primitive_cube_add()
    with pytest.raises(TypeError):
        bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="100")
    # the operator's budget snaps the same way (3 faces cannot close a mesh; 4 can)
    assert bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32", max_faces=3) == {"FINISHED"}
    assert len(bpy.context.active_object.data.polygons) == request_options.MIN_FACE_BUDGET


def test_setup_refuses_to_download_while_blender_is_offline(addon, tmp_path):
    assert bpy.app.online_access is False  # the bpy module starts offline, as a fresh Blender does
    target = tmp_path / "venv"
    with pytest.raises(RuntimeError, match="Allow Online Access"):
        bpy.ops.occnet.setup_environment(target=str(target), install_packages=True)
    with pytest.raises(RuntimeError, match="not a package requirement"):
        bpy.ops.occnet.setup_environment(target=str(target), install_packages=True,
                                         extra_requirements="--index-url https://example.com")
    assert not target.exists()


def _wait_for_probe(preferences):
    deadline = time.monotonic() + 120
    while preferences.check_state["checking"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_python_without_torch_is_refused_with_a_fix(scene, addon, tiny_checkpoints, tmp_path):
    from helpers_addon import python_without_torch

    from blender_occnet import preferences
    from blender_occnet.panel import OCCNET_PT_panel
    prefs = _prefs(tiny_checkpoints)
    addon.session.shutdown()
    python = python_without_torch(tmp_path)
    try:
        prefs.python_path = python  # checked when chosen, in the background
        _wait_for_probe(preferences)
        assert not preferences.check_state["result"].ok
        assert "lacks torch" in preferences.check_state["result"].problem()
        bpy.ops.mesh.primitive_cube_add()
        with pytest.raises(RuntimeError, match="lacks torch.*pip install torch"):
            bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32")
        assert addon.session.client is None  # no backend was started that could only fail
        assert addon.prestart_timer() is None  # ... nor at start-up: the panel says why
        assert not addon.session.backend_running and "lacks torch" in addon.session.last_error
        log = []
        OCCNET_PT_panel.draw(type("P", (), {"layout": _Recorder(log)})(), bpy.context)
        labels = [kw for name, _, kw in log if name == "label"]
        assert not any(kw.get("icon") == "CHECKMARK" for kw in labels)
        assert "lacks torch" in " ".join(kw.get("text", "") for kw in labels)
    finally:
        prefs.python_path = ""
        _wait_for_probe(preferences)
        addon.session.last_error = ""


class _Context:
    """bpy.context with a region of a chosen width (a panel's draw gets its sidebar's region)."""

    def __init__(self, width):
        self.region = type("Region", (), {"width": width})()

    def __getattr__(self, name):
        return getattr(bpy.context, name)


def test_panel_wraps_messages_to_the_region_on_word_boundaries(scene, addon):
    from blender_occnet import ui_text
    from blender_occnet.panel import OCCNET_PT_panel
    message = ("the backend was killed by signal 9 during the request. Backend output: "
               "RuntimeError: CUDA out of memory while evaluating the decoder [backend_exited]")
    addon.session.last_error = message
    try:
        lines_at = {}
        for width in (220, 700):
            log = []
            context = _Context(width)
            OCCNET_PT_panel.draw(type("P", (), {"layout": _Recorder(log)})(), context)
            labels = [kw for name, _, kw in log if name == "label"]
            first = next(i for i, kw in enumerate(labels) if kw.get("icon") == "ERROR")
            lines = [kw["text"] for kw in labels[first:]]
            assert " ".join(lines) == message  # every word whole, none lost
            scale = ui_text.ui_scale(context)
            assert all(ui_text.text_width(t, scale) <= ui_text.available_width(context) for t in lines)
            lines_at[width] = lines
        assert len(lines_at[220]) > len(lines_at[700]) >= 1
    finally:
        addon.session.last_error = ""
    long_path = "/a/really/long/folder/name/that/cannot/fit/on/one/line/at/all.safetensors"
    lines = ui_text.wrap(f"cannot read {long_path} now", 20, len)
    assert lines[0] == "cannot read" and all(len(t) <= 20 for t in lines)
    assert "".join(lines[1:]) == long_path + " now"  # only the path, too long for any line, is cut
    # a warning after the summary starts its own line, however wide the region
    assert ui_text.wrap("chair: 10 faces\nWarning: cut off", 200, len) == ["chair: 10 faces", "Warning: cut off"]


def test_selection_without_geometry_and_a_mesh_with_faces_only(scene, addon, tiny_checkpoints):
    _prefs(tiny_checkpoints)
    bpy.ops.object.empty_add()
    bpy.ops.object.camera_add()
    for obj in bpy.data.objects:
        obj.select_set(True)
    with pytest.raises(RuntimeError, match=r"Select mesh.*Empty \(empty\).*has no vertices"):
        bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", source="SELECTED")
    assert len(bpy.data.objects) == 2
    bpy.ops.mesh.primitive_cube_add(size=2.0)  # 6 faces, only its 8 corners become points
    assert bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", resolution="32") == {"FINISHED"}
    assert "from 8 points" in addon.session.last_info
    assert bpy.context.active_object.name.startswith("Cube_occnet")


def colour_link(obj):
    """(node feeding the Base Color of the object's material, its attribute name)."""
    material = obj.data.materials[0]
    bsdf = next(n for n in material.node_tree.nodes if n.bl_idname == "ShaderNodeBsdfPrincipled")
    base = bsdf.inputs["Base Color"]
    assert base.is_linked, "the material's Base Color does not read the colour attribute"
    node = base.links[0].from_node
    return node, node.layer_name


def srgb_colours(mesh, name="Color"):
    attr = mesh.color_attributes[name]
    assert attr.domain == "POINT" and mesh.color_attributes.active_color.name == name
    got = np.empty(len(attr.data) * 4, np.float32)
    attr.data.foreach_get("color_srgb", got)
    return got.reshape(-1, 4)


SURVEY_OFFSET = np.array([412_345.678, 5_312_345.678, 231.5])


def coloured_survey_scan(n=3000):
    """A 5 m sphere 5 * 10^6 m from the origin, red where x is below its centre, blue above."""
    directions = np.random.default_rng(0).normal(size=(n, 3))
    points = SURVEY_OFFSET + 5.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    colours = np.where((points[:, 0] < SURVEY_OFFSET[0])[:, None], [255, 0, 0], [0, 0, 255]).astype(np.uint8)
    return points, colours


def write_las(path, points, colours):
    import laspy

    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales, header.offsets = [0.001] * 3, points.min(axis=0)
    las = laspy.LasData(header)
    las.x, las.y, las.z = points.T
    las.red, las.green, las.blue = (colours.astype(np.uint16) * 257).T
    las.write(path)


def test_coloured_scan_file_gives_a_coloured_object_in_place(scene, addon, tiny_checkpoints, tmp_path):
    """A LAZ survey read by the backend's reader: the object sits on the survey's coordinates,
    its colour attribute holds the points' colours and its material's Base Color reads it."""
    _prefs(tiny_checkpoints)
    points, colours = coloured_survey_scan()
    write_las(tmp_path / "survey.laz", points, colours)
    res = bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", source="FILE", filepath=str(tmp_path / "survey.laz"),
                                          resolution="32")
    assert res == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj.name.startswith("survey_occnet")
    center = (points.min(0) + points.max(0)) / 2
    np.testing.assert_allclose(np.array(obj.location, np.float64), center, atol=0.5)  # float32 location
    local, _ = mesh_arrays(obj)
    world = local.astype(np.float64) + np.array(obj.location, np.float64)
    np.testing.assert_allclose((world.min(0) + world.max(0)) / 2, center, atol=0.05)
    rgba = srgb_colours(obj.data)
    left, right = world[:, 0] < center[0] - 1.0, world[:, 0] > center[0] + 1.0
    assert left.any() and right.any()
    np.testing.assert_allclose(rgba[left], [[1, 0, 0, 1]] * int(left.sum()), atol=1e-4)
    np.testing.assert_allclose(rgba[right], [[0, 0, 1, 1]] * int(right.sum()), atol=1e-4)
    node, layer = colour_link(obj)
    assert node.bl_idname == "ShaderNodeVertexColor" and layer == "Color"

    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.vertex_colours = False  # the preference: results without colours
    try:
        res = bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", source="FILE", filepath=str(tmp_path / "survey.laz"),
                                              resolution="32")
    finally:
        prefs.vertex_colours = True
    assert res == {"FINISHED"}
    assert len(bpy.context.active_object.data.color_attributes) == 0


def test_import_point_cloud_then_reconstruct_from_the_selection(scene, addon, tiny_checkpoints, tmp_path):
    """File > Import > Point Cloud reads a PCD through the backend: an object of vertices with their
    colours; Mesh from Point Cloud on it carries the colours on."""
    import pypcd4

    _prefs(tiny_checkpoints)
    points, colours = coloured_survey_scan(2000)
    local = (points - SURVEY_OFFSET).astype(np.float32)
    pypcd4.PointCloud.from_xyzrgb_points(np.column_stack([local, pypcd4.PointCloud.encode_rgb(colours)])
                                         ).save(tmp_path / "scan.pcd")
    assert bpy.ops.occnet.import_point_cloud("EXEC_DEFAULT", filepath=str(tmp_path / "scan.pcd")) == {"FINISHED"}
    cloud = bpy.context.active_object
    assert cloud.name == "scan" and len(cloud.data.vertices) == 2000 and len(cloud.data.polygons) == 0
    np.testing.assert_allclose(srgb_colours(cloud.data)[:, :3], colours / 255.0, atol=1e-4)
    assert colour_link(cloud)[1] == "Color"
    world = mesh_arrays_vertices(cloud) + np.array(cloud.location)
    np.testing.assert_allclose(world, local, atol=1e-4)

    assert bpy.ops.occnet.mesh_from_points("EXEC_DEFAULT", source="SELECTED", resolution="32") == {"FINISHED"}
    mesh = bpy.context.active_object
    assert mesh.name.startswith("scan_occnet") and len(mesh.data.polygons) > 0
    rgba = srgb_colours(mesh.data)
    world = mesh_arrays_vertices(mesh) + np.array(mesh.location)
    left, right = world[:, 0] < -1.0, world[:, 0] > 1.0
    assert left.any() and right.any()
    np.testing.assert_allclose(rgba[left], [[1, 0, 0, 1]] * int(left.sum()), atol=1e-4)
    np.testing.assert_allclose(rgba[right], [[0, 0, 1, 1]] * int(right.sum()), atol=1e-4)


def mesh_arrays_vertices(obj):
    v = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", v)
    return v.reshape(-1, 3)


def test_dropped_files_are_reconstructed(scene, addon, tiny_checkpoints, tmp_path):
    """The file handler that a drop onto the 3D Viewport uses, and its operator with the
    directory + files a drop of several files gives (run in EXEC mode: the bpy module has no
    window to drop onto)."""
    from PIL import Image

    _prefs(tiny_checkpoints)
    handler = bpy.types.FileHandler.bl_rna_get_subclass_py("OCCNET_FH_reconstruct")
    assert handler.bl_import_operator == "occnet.reconstruct_files"
    assert {".las", ".laz", ".e57", ".pcd", ".ply", ".png", ".jpg"} <= set(handler.bl_file_extensions.split(";"))
    importer = bpy.types.FileHandler.bl_rna_get_subclass_py("OCCNET_FH_import_point_cloud")
    assert importer.bl_import_operator == "occnet.import_point_cloud"
    np.savetxt(tmp_path / "dropped.xyz", np.random.default_rng(0).uniform(-1, 1, (400, 3)))
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (200, 60, 30, 255)
    Image.fromarray(rgba).save(tmp_path / "dropped.png")
    res = bpy.ops.occnet.reconstruct_files("EXEC_DEFAULT", directory=str(tmp_path),
                                           files=[{"name": "dropped.xyz"}, {"name": "dropped.png"}])
    assert res == {"FINISHED"}
    names = sorted(o.name for o in bpy.data.objects)
    assert len(names) == 2 and names[0].startswith("dropped_occnet") and names[1].startswith("dropped_occnet")
    with pytest.raises(RuntimeError, match="Not a point cloud or image"):
        bpy.ops.occnet.reconstruct_files("EXEC_DEFAULT", filepath=str(tmp_path / "notes.docx"))


def test_fitted_field_gives_an_object_with_its_texture_colours(scene, addon, textured_field):
    """Mesh from Fitted Field: the backend's surface of a field with a texture head arrives with its
    colours in a colour attribute, shown by the object's material (Base Color reads it)."""
    from conftest import TEXTURE_SLOPE

    bpy.context.scene.cursor.location = (1.0, 2.0, 3.0)
    res = bpy.ops.occnet.mesh_from_field("EXEC_DEFAULT", filepath=str(textured_field), resolution="32")
    assert res == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj.name == f"{textured_field.parent.name}_occnet" and tuple(obj.location) == (1.0, 2.0, 3.0)
    local, _ = mesh_arrays(obj)
    assert np.abs(local).sum(axis=1).max() < 0.45  # the field's octahedron of radius 0.4
    red = 1.0 / (1.0 + np.exp(-TEXTURE_SLOPE * local[:, 0]))
    np.testing.assert_allclose(srgb_colours(obj.data), np.stack([red, 1 - red, 1 - red, np.ones_like(red)], 1),
                               atol=1e-4)
    node, layer = colour_link(obj)
    assert node.bl_idname == "ShaderNodeVertexColor" and layer == "Color"


def test_fitted_field_needs_its_file(scene, addon):
    with pytest.raises(RuntimeError, match="Choose a fitted field"):
        bpy.ops.occnet.mesh_from_field("EXEC_DEFAULT")
