"Planted answers for the MD-MNIST exercises (03_mdmnist): the library's versions pass, plausible mistakes fail."
import numpy as np

from dalle_course.mdmnist import colorize, slot_box


# ---- colorize(digit (h, w) uint8, colour) -> (h, w, 3) uint8 ----

def colorize_bgr(digit, colour):  # channel order reversed: red written to channel 2
    out = np.zeros(digit.shape + (3,), np.uint8)
    for c in {'w': [0, 1, 2], 'r': [2], 'g': [1], 'b': [0]}[colour]: out[..., c] = digit
    return out

def colorize_white_one_channel(digit, colour):  # forgets that white is all three channels
    out = np.zeros(digit.shape + (3,), np.uint8)
    out[..., {'w': 0, 'r': 0, 'g': 1, 'b': 2}[colour]] = digit
    return out

def colorize_float(digit, colour):  # right pattern, but floats in [0, 1]
    return colorize(digit, colour).astype(np.float32) / 255

def colorize_channels_first(digit, colour):  # (3, h, w) instead of (h, w, 3)
    return np.ascontiguousarray(colorize(digit, colour).transpose(2, 0, 1))

def colorize_transposed(digit, colour):  # swaps rows and columns of the digit
    return colorize(digit.T, colour)

def colorize_rgb_order_wrong(digit, colour):  # 'g' and 'b' swapped
    return colorize(digit, {'g': 'b', 'b': 'g'}.get(colour, colour))


# ---- slot_box(slot, position, size_px, canvas) -> (top, left) ----

def slot_box_centre(slot, position, size_px, canvas):  # returns the box centre, not its corner
    k = ['up', 'middle', 'down'].index(position)
    return round((2 * k + 1) * canvas / 6), round((2 * slot + 1) * canvas / 6)

def slot_box_swapped(slot, position, size_px, canvas):  # (left, top) instead of (top, left)
    top, left = slot_box(slot, position, size_px, canvas)
    return left, top

def slot_box_fixed_canvas(slot, position, size_px, canvas):  # ignores the canvas size: always 128
    return slot_box(slot, position, size_px, 128)

def slot_box_truncates(slot, position, size_px, canvas):  # int() truncates instead of rounding
    k = ['up', 'middle', 'down'].index(position)
    return int((2 * k + 1) * canvas / 6 - size_px / 2), int((2 * slot + 1) * canvas / 6 - size_px / 2)

def slot_box_float(slot, position, size_px, canvas):  # unrounded floats
    k = ['up', 'middle', 'down'].index(position)
    return (2 * k + 1) * canvas / 6 - size_px / 2, (2 * slot + 1) * canvas / 6 - size_px / 2

def slot_box_column_edge(slot, position, size_px, canvas):  # centres the box on the column's left edge
    top, _ = slot_box(slot, position, size_px, canvas)
    return top, max(0, round(slot * canvas / 3 - size_px / 2))


PLANTED = {
    'check_colorize': (colorize, [colorize_bgr, colorize_white_one_channel, colorize_float, colorize_channels_first,
                                  colorize_transposed, colorize_rgb_order_wrong]),
    'check_slot_box': (slot_box, [slot_box_centre, slot_box_swapped, slot_box_fixed_canvas, slot_box_truncates,
                                  slot_box_float, slot_box_column_edge]),
}
