"""The `altdiff serve` page in Debian's headless Chromium, driven as a user would: generate with Ctrl+Enter,
read and copy the generation info, seed buttons, interrupt, a refused field, the LoRA/embedding pickers,
send to img2img with a painted mask, hires fix, PNG Info, reload (history and settings back), a phone-sized
window and a server that went away. axe-core checks every state for accessibility violations."""

import base64
import io
import os
import tempfile
from pathlib import Path

import PIL.Image
import pytest
import requests
import torch
from serving import Server, decode

from altdiff.infotext import parse_infotext
from altdiff.serve import ServeConfig

PROMPT = "一只戴着帽子的猫"
AXE = Path(os.environ.get("ALTDIFF_AXE_JS", Path.home() / ".cache/altdiff-axe/node_modules/axe-core/axe.min.js"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, m9_folder):
    root = tmp_path_factory.mktemp("page")
    (root / "loras").mkdir()
    (root / "loras" / "detail.safetensors").write_bytes(b"")  # /loras lists files; only generating reads them
    (root / "models").mkdir()
    (root / "models" / "m9-copy").symlink_to(m9_folder, target_is_directory=True)
    (root / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "style"}, root / "embeddings" / "style.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}, "name": "wide"}, root / "embeddings" / "wide.pt")
    s = Server(ServeConfig(models=[str(m9_folder)], models_dir=str(root / "models"), device="cpu",
                           lora_dir=str(root / "loras"),
                           embeddings_dir=str(root / "embeddings")))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert Path(path).exists(), f"{path} missing: apt-get install chromium chromium-driver (.ci/run does)"
    assert AXE.exists(), f"{AXE} missing: npm install --prefix ~/.cache/altdiff-axe axe-core (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='altdiff-chromium-')}", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def by_id(browser, name):
    from selenium.webdriver.common.by import By
    return browser.find_element(By.ID, name)


def wait(browser, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)


def field(browser, name, value):
    element = by_id(browser, name)
    element.clear()
    element.send_keys(str(value))


def figures(browser):
    return browser.execute_script("return document.querySelectorAll('#gallery figure').length")


def open_page(browser, server):
    browser.get(server.url)
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    # Every request body the page sends, for the tests to read back.
    browser.execute_script("""window.sent = []; const original = window.fetch;
        window.fetch = (url, init) => { if (init && init.body) window.sent.push([url, JSON.parse(init.body)]);
                                         return original(url, init); };""")


def last_sent(browser, route):
    return browser.execute_script(f"return window.sent.filter(([u]) => u.endsWith('{route}')).at(-1)[1]")


def axe(browser, state):
    """axe-core's WCAG 2 A/AA and best-practice rules: no violations, in the light and the dark theme."""
    if not browser.execute_script("return typeof axe !== 'undefined'"):
        browser.execute_script(AXE.read_text())
    for theme in ("light", "dark"):
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                {"features": [{"name": "prefers-color-scheme", "value": theme}]})
        result = browser.execute_async_script("axe.run(document).then(arguments[arguments.length - 1]);")
        problems = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in result["violations"]]
        assert problems == [], f"{state}, {theme} theme: {problems}"


def generate(browser):
    n = figures(browser)
    by_id(browser, "generate").click()
    wait(browser, lambda d: figures(d) > n or by_id(d, "error").is_displayed())


def test_fresh_page_lists_the_servers_samplers_and_passes_axe(server, browser):
    open_page(browser, server)
    options = lambda name: browser.execute_script(  # noqa: E731
        f"return [...document.querySelectorAll('#{name} option')].map(o => o.value)")
    assert options("sampler_name") == [s["name"] for s in requests.get(server.url + "/sdapi/v1/samplers").json()]
    assert options("scheduler") == [s["label"] for s in requests.get(server.url + "/sdapi/v1/schedulers").json()]
    assert by_id(browser, "sampler_name").get_attribute("value") == "Euler a"
    assert options("model") == [m["title"] for m in requests.get(server.url + "/sdapi/v1/sd-models").json()]
    assert options("embedding_picker")[1:] == ["style"]  # "wide" does not fit the model: /embeddings skips it
    assert not by_id(browser, "styles_label").is_displayed()  # no styles on this server
    assert by_id(browser, "skip").is_displayed()  # the server has /sdapi/v1/skip
    assert browser.execute_script("return document.querySelector('link[rel=icon]').href").endswith("favicon.svg")
    assert requests.get(server.url + "/web/favicon.svg").ok
    axe(browser, "fresh")


def test_ctrl_enter_with_a_blank_seed_shows_the_info_and_announces_once(server, browser):
    from selenium.webdriver.common.keys import Keys

    for name, value in (("width", 32), ("height", 32), ("steps", 2)):
        field(browser, name, value)
    by_id(browser, "seed").clear()
    browser.execute_script("""window.announced = [];
        new MutationObserver(() => window.announced.push(document.getElementById('status').textContent))
            .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});""")
    prompt = by_id(browser, "prompt")
    prompt.send_keys(PROMPT)
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)
    wait(browser, lambda d: figures(d) == 1)
    assert last_sent(browser, "txt2img")["seed"] == -1  # blank is random, not 0
    info = by_id(browser, "gallery").find_element("css selector", "pre.info").text
    prompt_text, _, params = parse_infotext(info)
    assert prompt_text == PROMPT and params["Size"] == "32x32" and params["Steps"] == "2"
    src = browser.find_element("css selector", "#gallery img").get_attribute("src")
    assert decode(src.partition(",")[2]).info["parameters"] == info
    wait(browser, lambda d: len(d.execute_script("return window.announced")) >= 2)
    announced = browser.execute_script("return window.announced")
    assert announced[0] == "Generating…" and announced[1].startswith("1 image in") and len(announced) == 2
    link = browser.find_element("css selector", "#gallery figcaption a")
    assert link.get_attribute("download") == f"altdiff-{params['Seed']}.png"
    assert link.get_attribute("aria-label") == f"download image, seed {params['Seed']}"

    copy = browser.find_element("css selector", "#gallery figcaption button")
    copy.click()
    wait(browser, lambda d: copy.text == "Copied")
    assert by_id(browser, "status").text == "Copied the generation info."
    by_id(browser, "seed_reuse").click()
    assert by_id(browser, "seed").get_attribute("value") == params["Seed"]
    by_id(browser, "seed_random").click()
    assert by_id(browser, "seed").get_attribute("value") == "-1"

    browser.find_element("css selector", "#gallery button.enlarge").click()
    assert by_id(browser, "lightbox").is_displayed()
    assert by_id(browser, "lightbox-image").get_attribute("src") == src
    axe(browser, "results, larger view")
    by_id(browser, "lightbox-close").click()
    assert not by_id(browser, "lightbox").is_displayed()
    axe(browser, "results")


def test_interrupt_says_so_and_the_progress_shows_an_eta(server, browser):
    for name, value in (("steps", 150), ("n_iter", 3), ("seed", 3)):
        field(browser, name, value)
    n = figures(browser)
    by_id(browser, "generate").click()
    wait(browser, lambda d: "ETA" in by_id(d, "progress_text").text)
    by_id(browser, "interrupt").click()
    wait(browser, lambda d: figures(d) > n)
    assert by_id(browser, "status").text.startswith("Interrupted: 1 image in")
    assert by_id(browser, "progress_text").text == ""
    field(browser, "steps", 2)
    field(browser, "n_iter", 1)


def test_live_preview_and_skip_when_the_server_has_them(server, browser):
    """altdiff sends no current_image and has no /skip yet: a server that has them is stood in for by
    answering those two fetches in the page, before its scripts run."""
    dot = base64.b64encode(requests.get(server.url + "/web/favicon.svg").content).decode()  # any image data
    stub = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": f"""
        const original = window.fetch;
        window.fetch = async (url, init) => {{
            const response = await original(url, init);
            if (url === "openapi.json") {{
                const schema = await response.json();
                schema.paths["/sdapi/v1/skip"] = {{}};
                return new Response(JSON.stringify(schema));
            }}
            if (String(url).startsWith("sdapi/v1/progress")) {{
                const report = await response.json();
                if (report.state.job_count) report.current_image = "{dot}";
                return new Response(JSON.stringify(report));
            }}
            return response;
        }};"""})
    try:
        open_page(browser, server)
        assert by_id(browser, "skip").is_displayed()
        field(browser, "steps", 150)
        n = figures(browser)
        by_id(browser, "generate").click()
        wait(browser, lambda d: by_id(d, "preview").is_displayed())
        assert by_id(browser, "preview").get_attribute("src") == f"data:image/png;base64,{dot}"
        by_id(browser, "skip").click()
        wait(browser, lambda d: d.execute_script("return window.sent.some(([u]) => u.endsWith('skip'))"))
        by_id(browser, "interrupt").click()
        wait(browser, lambda d: figures(d) > n)
        assert not by_id(browser, "preview").is_displayed()
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": stub["identifier"]})
        field(browser, "steps", 2)
    open_page(browser, server)


def test_a_refused_field_gets_focus_aria_invalid_and_its_message(server, browser):
    field(browser, "width", 100)
    generate(browser)
    assert "multiple of 8" in by_id(browser, "error").text
    width = by_id(browser, "width")
    assert width.get_attribute("aria-invalid") == "true"
    assert browser.execute_script("return document.activeElement.id") == "width"
    note = by_id(browser, width.get_attribute("aria-describedby"))
    assert "multiple of 8" in note.text
    assert by_id(browser, "status").text.startswith("Failed")
    axe(browser, "error")
    field(browser, "width", 32)
    generate(browser)
    assert width.get_attribute("aria-invalid") is None and not by_id(browser, "error").is_displayed()


def test_lora_and_embedding_pickers_insert_at_the_prompt(server, browser):
    from selenium.webdriver.support.ui import Select

    field(browser, "prompt", "a cat")
    Select(by_id(browser, "lora_picker")).select_by_value("detail")
    Select(by_id(browser, "embedding_picker")).select_by_value("style")
    assert by_id(browser, "prompt").get_attribute("value") == "a cat <lora:detail:1> style"
    assert by_id(browser, "lora_picker").get_attribute("value") == ""
    field(browser, "prompt", PROMPT)


def test_the_model_selector_loads_the_model(server, browser):
    from selenium.webdriver.support.ui import Select

    model = Select(by_id(browser, "model"))
    assert [o.text for o in model.options] == ["m9", "m9-copy"]
    model.select_by_visible_text("m9-copy")
    wait(browser, lambda d: by_id(d, "status").text == "Model: m9-copy")
    assert requests.get(server.url + "/sdapi/v1/options").json()["sd_model_checkpoint"] == "m9-copy"


def test_send_to_img2img_paints_a_mask_and_sends_it(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains

    browser.find_element("css selector", "#gallery figcaption button[aria-label^='Send image']").click()
    wait(browser, lambda d: by_id(d, "init_panel").is_displayed())
    canvas = by_id(browser, "mask")
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("32", "32")
    field(browser, "brush", 0)  # the range's minimum: a small dot
    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(5, 0).release().perform()
    axe(browser, "mask")
    generate(browser)
    body = last_sent(browser, "img2img")
    mask = PIL.Image.open(io.BytesIO(base64.b64decode(body["mask"].partition(",")[2]))).convert("L")
    init = decode(body["init_images"][0].partition(",")[2])
    assert mask.size == init.size == (32, 32)
    assert mask.getpixel((16, 16)) == 255 and mask.getpixel((0, 0)) == 0
    # The server inpaints: a new image, the picture kept where the mask is black, and no error.
    assert not by_id(browser, "error").is_displayed()
    result = decode(browser.find_element("css selector", "#gallery img").get_attribute("src").partition(",")[2])
    assert result.size == (32, 32) and result.getpixel((0, 0)) == init.convert("RGB").getpixel((0, 0))

    by_id(browser, "mask_invert").click()
    generate(browser)
    mask = PIL.Image.open(io.BytesIO(base64.b64decode(last_sent(browser, "img2img")["mask"].partition(",")[2])))
    assert mask.convert("L").getpixel((16, 16)) == 0 and mask.convert("L").getpixel((0, 0)) == 255
    by_id(browser, "mask_clear").click()
    generate(browser)
    assert "mask" not in last_sent(browser, "img2img") and not by_id(browser, "error").is_displayed()
    by_id(browser, "init_clear").click()
    assert not by_id(browser, "init_panel").is_displayed()
    assert browser.execute_script("return document.getElementById('init_image').files.length") == 0


def test_hires_fix_sends_the_webuis_fields(server, browser):
    by_id(browser, "enable_hr").click()
    field(browser, "hr_scale", 1.5)
    field(browser, "hr_second_pass_steps", 1)
    field(browser, "denoising_strength", 0.5)
    generate(browser)
    body = last_sent(browser, "txt2img")
    assert {k: body[k] for k in ("enable_hr", "hr_scale", "hr_second_pass_steps", "hr_upscaler",
                                 "denoising_strength")} == {"enable_hr": True, "hr_scale": 1.5,
                                                            "hr_second_pass_steps": 1, "hr_upscaler": "Latent",
                                                            "denoising_strength": 0.5}
    # The server runs the hires fix: the newest image is the second pass's 1.5 times the size.
    assert not by_id(browser, "error").is_displayed()
    result = decode(browser.find_element("css selector", "#gallery img").get_attribute("src").partition(",")[2])
    assert result.size == (48, 48)
    by_id(browser, "enable_hr").click()
    generate(browser)
    assert "enable_hr" not in last_sent(browser, "txt2img") and not by_id(browser, "error").is_displayed()


def test_png_info_reads_a_png_and_sends_it_to_txt2img(server, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    src = browser.find_element("css selector", "#gallery img").get_attribute("src")
    png = tmp_path / "result.png"
    png.write_bytes(base64.b64decode(src.partition(",")[2]))
    by_id(browser, "tab_pnginfo").click()
    by_id(browser, "png_file").send_keys(str(png))
    wait(browser, lambda d: by_id(d, "png_text").get_attribute("value"))
    text = by_id(browser, "png_text").get_attribute("value")
    assert text == PIL.Image.open(png).info["parameters"]
    axe(browser, "PNG Info")
    # The page's own infotext parser agrees with the server's png-info on every key it reads.
    server_params = requests.post(server.url + "/sdapi/v1/png-info", json={"image": src}).json()["parameters"]
    page_params = browser.execute_async_script(
        "import('/web/infotext.js').then(m => arguments[1](m.parseInfotext(arguments[0])))", text)
    assert len(page_params) > 8 and {k: str(server_params[k]) for k in page_params} == page_params

    browser.execute_script("document.getElementById('seed').value = 77; document.getElementById('steps').value = 9")
    by_id(browser, "png_to_txt2img").click()
    assert by_id(browser, "panel_generate").is_displayed() and not by_id(browser, "panel_pnginfo").is_displayed()
    _, _, params = parse_infotext(text)
    assert by_id(browser, "seed").get_attribute("value") == params["Seed"]
    assert by_id(browser, "steps").get_attribute("value") == params["Steps"]

    by_id(browser, "tab_generate").send_keys(Keys.ARROW_RIGHT)  # the ARIA tabs pattern's arrow keys
    assert browser.execute_script("return document.activeElement.id") == "tab_pnginfo"
    assert by_id(browser, "panel_pnginfo").is_displayed()
    pasted = "a dog\nNegative prompt: rain\nSteps: 7, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, " \
             "Seed: 1234, Size: 48x40"
    field(browser, "png_text", pasted)
    by_id(browser, "png_to_txt2img").click()
    values = {n: by_id(browser, n).get_attribute("value") for n in
              ("prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "cfg_scale", "seed", "width",
               "height")}
    assert values == {"prompt": "a dog", "negative_prompt": "rain", "steps": "7", "sampler_name": "DPM++ 2M",
                      "scheduler": "Karras", "cfg_scale": "4.5", "seed": "1234", "width": "48", "height": "40"}


def test_reload_brings_back_history_and_settings(server, browser):
    field(browser, "width", 32)
    field(browser, "height", 32)
    field(browser, "steps", 2)
    n = figures(browser)
    infos = browser.execute_script("return [...document.querySelectorAll('pre.info')].map(p => p.textContent)")
    open_page(browser, server)
    wait(browser, lambda d: figures(d) == n)
    assert browser.execute_script("return [...document.querySelectorAll('pre.info')].map(p => p.textContent)") \
        == infos
    values = {n: by_id(browser, n).get_attribute("value") for n in ("prompt", "sampler_name", "scheduler", "seed",
                                                                     "width", "steps")}
    assert values == {"prompt": "a dog", "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": "1234",
                      "width": "32", "steps": "2"}


def test_a_phone_scrolls_to_the_new_result(server, browser):
    browser.set_window_size(390, 844)
    try:
        browser.execute_script("window.scrollTo(0, 0)")
        generate(browser)
        top = "return document.querySelector('#gallery figure').getBoundingClientRect().top"
        wait(browser, lambda d: d.execute_script("return window.scrollY") > 0, 10)
        assert -1 < browser.execute_script(top) < 844  # at the top, to subpixel rounding
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        browser.set_window_size(1280, 900)


def test_server_gone_says_so(server, browser):
    server.close()
    by_id(browser, "generate").click()
    wait(browser, lambda d: by_id(d, "error").is_displayed())
    error = by_id(browser, "error").text
    assert "not answering" in error and "Failed to fetch" not in error
    assert by_id(browser, "progress_text").text == "" and by_id(browser, "status").text.startswith("Failed")
    assert not by_id(browser, "generate").get_attribute("disabled")
    axe(browser, "server gone")
