// sd-webui-perfusion: hover hints for the Perfusion accordion. The WebUI shows the entries of its global
// `titles` map as tooltips on elements whose text matches a key; nothing else is needed by the cards.
onUiLoaded(function perfusionAddHints() {
    if (typeof titles === "undefined") {
        return;
    }
    Object.assign(titles, {
        "Apply <perfusion:...> tags": "Off: prompt tags <perfusion:NAME> are ignored and the base model is used.",
        "Key locking": "local: the concept's keys are locked to its superclass word (recommended). " +
            "global: every key sees the superclass-substituted prompt (try beta 0.4-0.6).",
        "Several concepts": "How concepts in one prompt share the rank-1 edit: approximate (fast) or exact projection.",
        "Gate bias beta": "Used when a tag gives none. Higher: weaker concept, closer to the rest of the prompt; " +
            "lower: stronger likeness.",
        "Gate temperature tau": "Used when a tag gives none (<perfusion:NAME:TAU>). Higher: softer gate."
    });
});

// The training tab's Train button: a task id for the WebUI's progress API, live previews and loss text; the
// progress line ends on the run's outcome (the first line of the result, or of the problems when it failed).
function perfusion_start_training() {
    var app = gradioApp();
    app.querySelector('#perfusion_train_error').innerHTML = '';
    var before = app.querySelector('#perfusion_train_output').innerText.trim();  // the last run's result
    var id = randomId();
    requestProgress(id, app.getElementById('perfusion_train_output'),
        app.getElementById('perfusion_train_output'), function() {
            perfusion_show_outcome(before);
        }, function(progress) {
            app.getElementById('perfusion_train_progress').textContent = progress.textinfo;
        });
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}

// The task is over, its result arrives through gradio a moment later: wait for it (at most 30 s); `before` is
// the result shown when the run started.
function perfusion_show_outcome(before) {
    var app = gradioApp();
    var tries = 0;
    var poll = setInterval(function() {
        var texts = ['#perfusion_train_output', '#perfusion_train_error'].map(function(sel) {
            return app.querySelector(sel).innerText.trim();
        });
        var waited = ++tries > 120;  // the same text as the last run's (or nothing came): show what is there
        var outcome = texts[0] && (texts[0] != before || waited) ? texts[0] : texts[1];
        if (outcome || waited) {
            clearInterval(poll);
            if (outcome) app.getElementById('perfusion_train_progress').textContent = outcome.split('\n')[0];
        }
    }, 250);
}
