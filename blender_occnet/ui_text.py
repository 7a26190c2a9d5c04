"""Messages as labels that fit the region they are drawn in. Blender clips a label wider than its
region in the middle of the text ("the backend was k...uest"), so long messages are wrapped to the
region's width, measured with Blender's UI font at the user's UI scale, on word boundaries."""

import blf

UI_FONT_ID = 0  # Blender's default UI font
UI_TEXT_POINTS = 11  # the size of label text at UI scale 1
# the panel's side margins and the icon in front of each line, in pixels at UI scale 1
LABEL_INSET_PX = 50
FALLBACK_REGION_PX = 300


def ui_scale(context):
    prefs = context.preferences
    # system.ui_scale includes the display's DPI; it is 0 without a window (background mode)
    return prefs.system.ui_scale or prefs.view.ui_scale or 1.0


def text_width(text, scale):
    blf.size(UI_FONT_ID, UI_TEXT_POINTS * scale)
    return blf.dimensions(UI_FONT_ID, text)[0]


def available_width(context):
    """Pixels a label's text may take in the current region."""
    region = getattr(context, "region", None)
    width = region.width if region is not None and region.width > 0 else FALLBACK_REGION_PX
    return max(width - LABEL_INSET_PX * ui_scale(context), 40.0)


def wrap(text, max_width, measure):
    """Lines of ``text`` no wider than ``max_width`` by ``measure(str) -> float``, broken between
    words; only a single word wider than a whole line (a long path) is broken inside. Each line of
    ``text`` (a warning after a summary) starts a new one."""
    return [line for paragraph in text.split("\n") for line in _wrap_paragraph(paragraph, max_width, measure)]


def _wrap_paragraph(text, max_width, measure):
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if measure(candidate) <= max_width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while measure(line) > max_width and len(line) > 1:
            cut = _longest_fitting_prefix(line, max_width, measure)
            lines.append(line[:cut])
            line = line[cut:]
    return lines + [line] if line else lines


def _longest_fitting_prefix(word, max_width, measure):
    cut = len(word) - 1
    while cut > 1 and measure(word[:cut]) > max_width:
        cut -= 1
    return cut


def draw_wrapped(layout, context, text, icon, max_lines=12):
    """Labels for ``text`` wrapped to the region; the icon on the first line only."""
    scale = ui_scale(context)
    lines = wrap(text, available_width(context), lambda s: text_width(s, scale))
    for i, line in enumerate(lines[:max_lines]):
        layout.label(text=line, icon=icon if i == 0 else "BLANK1")
