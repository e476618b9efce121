"""The chat page in a real browser: Debian's headless Chromium (installed by .ci/run, never downloaded by
a Python package) driven by Selenium against `pocketgpt serve` on a tiny run."""

import os
import re
import shutil
import time

import pytest
import torch
from test_serve import KEY, start_server

from pocketgpt.checkpoint import save_model
from pocketgpt.model import GPT, preset

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    # CI installs them (.ci/run): there a missing browser is a failure, on a developer's machine a skip.
    assert not os.environ.get("CI"), "chromium and chromium-driver are missing: apt-get install chromium chromium-driver"
    pytest.skip("Debian's chromium and chromium-driver are not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory, chat):
    run = tmp_path_factory.mktemp("page") / "run"
    for seed, stage in ((0, "sft"), (1, "ppo")):  # a second model, for the arena tab's battles
        torch.manual_seed(seed)
        # a long context, so that a reply takes seconds to write and can be watched (and stopped) mid-way
        model = GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size, max_seq_len=8192))
        with torch.no_grad():  # a random model writes special tokens, which a reply's text leaves out: not these
            model.lm_head.weight[list(chat.tokenizer.special_ids.values())] = 0
        save_model(model, run / stage, chat, {"stage": stage})
    proc, url = start_server(run, "--arena-db", str(run / "votes.db"))
    driver = None
    try:  # whatever fails while setting up, the server and the browser do not outlive the test
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60, poll_frequency=0.02)
        wait.until(lambda d: "needs an API key" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == "ppo")
        assert driver.find_element(By.ID, "status").text == ""
        set_value(driver, "temperature", "0")  # greedy: this random model then repeats itself and never ends a turn
        yield driver, wait
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(timeout=10)


def set_value(driver, element_id: str, value: str) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('change'))", element_id, value)


def assistant_text(driver) -> str:
    """The last reply's text, read in the page (the reply's element is rebuilt while it streams)."""
    return driver.execute_script("const r = document.querySelectorAll('.msg.assistant .content');"
                                 "return r.length ? r[r.length - 1].textContent : ''")


def sending(driver) -> bool:
    return driver.execute_script("return document.getElementById('send').hidden")


def test_send_a_message_and_see_it_stream(page):
    driver, wait = page
    set_value(driver, "max-tokens", "1500")
    driver.find_element(By.ID, "input").send_keys("Hello there")
    driver.find_element(By.ID, "send").click()
    assert driver.execute_script("return document.querySelector('.msg.user .content').textContent") == "Hello there"
    seen = set()
    deadline = time.time() + 60
    while time.time() < deadline and sending(driver):
        seen.add(assistant_text(driver))
    wait.until(lambda d: not sending(d))
    final = assistant_text(driver)
    assert final  # the reply arrived...
    assert len(seen - {"", final}) >= 1  # ...in pieces: the page showed partial text before the end
    assert driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .actions button")  # regenerate is offered
    usage = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .usage").text  # what it cost, the cache's part too
    assert re.fullmatch(r"[1-9]\d* prompt tokens \(\d+ cached\), [1-9]\d* generated", usage)


def start_a_long_reply(driver, wait) -> None:
    """In a new conversation, a reply of up to 4,000 tokens, under way once this returns."""
    driver.find_element(By.ID, "new-chat").click()
    set_value(driver, "max-tokens", "4000")
    driver.find_element(By.ID, "input").send_keys("Write forever")
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: len(assistant_text(d)) > 0)


def test_stop_a_generation(page):
    driver, wait = page
    start_a_long_reply(driver, wait)
    assert sending(driver)
    driver.execute_script("document.getElementById('stop').click()")
    wait.until(lambda d: not sending(d))
    stopped = assistant_text(driver)
    time.sleep(1)
    assert assistant_text(driver) == stopped  # nothing more arrives after Stop
    stored = driver.execute_script("return JSON.parse(localStorage.getItem('pocketgpt.conversations'))")
    assert stored[0]["messages"][-2]["content"] == "Write forever"  # kept in the browser
    assert len(stored) == 2 and stored[1]["messages"][0]["content"] == "Hello there"


def test_continue_a_reply_cut_short(page):
    """A reply that ran into max tokens is offered "Continue", which asks the server for more of the same
    reply (continue_final_message) and adds it to that reply, not to a new one."""
    driver, wait = page
    driver.find_element(By.ID, "new-chat").click()
    set_value(driver, "max-tokens", "12")
    driver.find_element(By.ID, "input").send_keys("Tell me a long story")
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: not sending(d) and assistant_text(d))
    cut = driver.execute_script("return JSON.parse(localStorage.getItem('pocketgpt.conversations'))[0].messages")
    assert [m["role"] for m in cut] == ["user", "assistant"] and cut[1]["finish_reason"] == "length"
    buttons = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .actions button")
    next(b for b in buttons if b.text == "Continue").click()
    wait.until(lambda d: not sending(d) and len(assistant_text(d)) > len(cut[1]["content"]))
    stored = driver.execute_script("return JSON.parse(localStorage.getItem('pocketgpt.conversations'))[0].messages")
    assert len(stored) == 2 and stored[1]["content"].startswith(cut[1]["content"])
    assert stored[1]["usage"]["prompt_tokens"] > cut[1]["usage"]["prompt_tokens"]  # the reply so far was sent


def test_a_max_tokens_setting_beyond_the_context_left_is_capped(page, chat):
    """The page asked for its Max tokens setting whatever the prompt left of the context: a 128-token model
    at the default 256, or a long conversation, failed every message ("max_tokens ... exceed the context")."""
    driver, wait = page
    driver.find_element(By.ID, "new-chat").click()
    set_value(driver, "max-tokens", "4096")
    text = "many words " * 800
    assert 4096 < len(chat.tokenizer.encode(text)) < 8192 - 64  # the 8,192-token context leaves < 4,096
    set_value(driver, "input", text)
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: assistant_text(d) or d.find_elements(By.CSS_SELECTOR, ".msg.assistant .error"))
    driver.execute_script("document.getElementById('stop').click()")
    wait.until(lambda d: not sending(d))
    assert not driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .error")
    assert assistant_text(driver)


def test_while_a_reply_streams_it_stays_on_screen_and_nothing_else_is_asked(page):
    """Opening another conversation and this one again left the reply frozen on screen (written to an element
    no longer there) until it ended; Edit mid-reply started a second request that Stop could not reach."""
    driver, wait = page
    start_a_long_reply(driver, wait)
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .actions button") == []  # no Edit, no Regenerate
    driver.find_element(By.ID, "new-chat").click()
    driver.find_elements(By.CSS_SELECTOR, "#conversations li")[1].click()  # the one still streaming
    before = len(assistant_text(driver))
    wait.until(lambda d: len(assistant_text(d)) > before + 20)
    assert sending(driver)
    driver.execute_script("document.getElementById('stop').click()")
    wait.until(lambda d: not sending(d))
    assert [b.text for b in driver.find_elements(By.CSS_SELECTOR, ".msg.user .actions button")] == ["Edit"]


def test_a_conversation_longer_than_the_context_leaves_its_oldest_exchanges_out(page, chat):
    """Every message failed once a conversation outgrew the context ("the prompt has N tokens; this model's
    context is 128" from the fourth message on, on the quick model)."""
    driver, wait = page
    driver.find_element(By.ID, "new-chat").click()
    set_value(driver, "max-tokens", "8")
    text = "many words " * 900
    assert 4096 < len(chat.tokenizer.encode(text)) < 8192 - 64  # one fits the 8,192-token context, two do not
    for _ in range(2):
        set_value(driver, "input", text)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: not sending(d) and assistant_text(d))
    assert not driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .error")
    notes = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .usage")]
    assert notes[-1] == "2 earlier messages left out: the model's context holds no more"


def test_a_bad_setting_keeps_the_message_unsent_and_a_full_storage_is_said(page):
    """An invalid JSON schema left the message in the conversation without a reply; with the browser's storage
    full, Send cleared the box and did nothing."""
    driver, wait = page
    driver.find_element(By.ID, "new-chat").click()
    driver.execute_script("document.getElementById('json-mode').click();"
                          "document.getElementById('json-schema').value = '{not json'")
    driver.find_element(By.ID, "input").send_keys("Hi")
    driver.find_element(By.ID, "send").click()
    alert = wait.until(lambda d: d.switch_to.alert)
    assert alert.text.startswith("The JSON schema is not valid JSON")
    alert.accept()
    assert driver.find_element(By.ID, "input").get_attribute("value") == "Hi"
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    driver.execute_script("document.getElementById('json-mode').click()")
    # the browser's storage full: the message is still sent and answered, and the page says why it is not kept
    driver.execute_script("let s = 'x'.repeat(1 << 20); try { for (let i = 0; ; i++) localStorage.setItem('filler' + i, s) }"
                          " catch (e) { for (let k = 1 << 19; k >= 1; k >>= 1) try { localStorage.setItem('last' + k, 'x'.repeat(k)) } catch (e) {} }")
    try:
        set_value(driver, "max-tokens", "8")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: not sending(d) and assistant_text(d))
        assert driver.execute_script("return document.querySelector('#messages .msg.user .content').textContent") == "Hi"
        assert driver.find_element(By.ID, "status").text.startswith("The browser's storage for this page is full")
    finally:
        driver.execute_script("for (const k of Object.keys(localStorage)) if (/^(filler|last)/.test(k)) localStorage.removeItem(k)")


def test_tokenizer_view(page, chat):
    driver, wait = page
    driver.find_element(By.CSS_SELECTOR, "#tabs button[data-tab=tokenizer]").click()
    text = "Hello world! 9.11 vs 9.9 <|bos|>"
    box = driver.find_element(By.ID, "tok-input")
    box.clear()
    box.send_keys(text)
    ids = chat.tokenizer.encode(text)
    wait.until(lambda d: d.find_element(By.ID, "tok-count").text.startswith(f"{len(ids)} tokens"))
    pieces = driver.find_elements(By.CSS_SELECTOR, "#tok-pieces span")
    assert "".join(p.text for p in pieces).replace("\n", "") == text.replace("\n", "")
    assert [int(p.get_attribute("title")) for p in pieces] == ids
    assert not driver.find_elements(By.CSS_SELECTOR, "#tok-pieces span.special")  # user text is never special


def test_arena_vote_changes_the_leaderboard(page):
    driver, wait = page
    set_value(driver, "max-tokens", "8")
    driver.find_element(By.CSS_SELECTOR, "#tabs button[data-tab=arena]").click()
    board = "return document.querySelectorAll('#arena-board tbody tr').length"
    wait.until(lambda d: d.find_element(By.ID, "arena-view").is_displayed())
    time.sleep(0.5)  # the first leaderboard fetch
    assert driver.execute_script(board) == 0  # no votes yet
    driver.find_element(By.ID, "arena-input").send_keys("Which is larger, 9.11 or 9.9?")
    # one battle at a time: a second one started meanwhile had its vote recorded with the first one's answers
    assert driver.execute_script("const b = document.getElementById('arena-go'); b.click(); return b.disabled")
    vote_a = driver.find_element(By.CSS_SELECTOR, "#arena-vote button[data-vote=a]")
    wait.until(lambda d: vote_a.is_enabled())
    names = "return ['a', 'b'].map(s => document.getElementById('arena-name-' + s).textContent)"
    assert driver.execute_script(names) == ["", ""]  # anonymous until the vote
    vote_a.click()
    wait.until(lambda d: d.execute_script(board) == 2)
    assert "recorded" in driver.find_element(By.ID, "arena-status").text
    assert sorted(driver.execute_script(names)) == ["(ppo)", "(sft)"]
    # and a person sees them: the answers and the revealed names are on screen, not collapsed away
    assert sorted(driver.find_element(By.ID, f"arena-name-{side}").text for side in "ab") == ["(ppo)", "(sft)"]
    rows = driver.execute_script("return [...document.querySelectorAll('#arena-board tbody tr')]"
                                 ".map(r => r.children[1].textContent + ':' + r.children[4].textContent)")
    assert sorted(rows) == ["ppo:1", "sft:1"]
    # one vote bounds no rating (the one that won never lost): the page says so under the numbers
    assert driver.find_element(By.ID, "arena-note").text.startswith("Not ratings yet: too few votes")
