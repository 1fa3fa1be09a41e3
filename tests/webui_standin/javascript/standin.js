// The parts of the WebUI's script.js and progressbar.js (v1.10.1) that extensions call: gradioApp,
// onUiLoaded, randomId and requestProgress (a bar of class progressDiv > progress above the container,
// polling ./internal/progress; live previews inside the gallery element; atEnd when the task is over).
function gradioApp() {  // the <gradio-app> element (or its shadow root), with getElementById as on document
    const app = document.getElementsByTagName('gradio-app')[0];
    if (!app) return document;
    if (app.shadowRoot) return app.shadowRoot;
    app.getElementById = function(id) { return document.getElementById(id); };
    return app;
}

var uiLoadedCallbacks = [];
function onUiLoaded(callback) { uiLoadedCallbacks.push(callback); }
new MutationObserver(function(mutations, observer) {
    if (gradioApp().querySelector('#tabs')) {
        observer.disconnect();
        uiLoadedCallbacks.forEach(function(callback) { callback(); });
    }
}).observe(document, {childList: true, subtree: true});

function randomId() {
    return "task(" + Math.random().toString(36).slice(2, 9) + Math.random().toString(36).slice(2, 9) + ")";
}

function requestProgress(id_task, progressbarContainer, gallery, atEnd, onProgress, inactivityTimeout = 40) {
    const started = Date.now();
    let wasActive = false, idLivePreview = -1, livePreview = null;
    let bar = document.createElement('div');
    bar.className = 'progressDiv';
    const inner = document.createElement('div');
    inner.className = 'progress';
    bar.appendChild(inner);
    progressbarContainer.parentNode.insertBefore(bar, progressbarContainer);
    const finish = function() {
        if (!bar) return;
        bar.remove();
        if (livePreview) livePreview.remove();
        bar = null;
        atEnd();
    };
    const poll = function() {
        fetch('./internal/progress', {method: 'POST', headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({id_task: id_task, id_live_preview: idLivePreview})})
            .then(function(r) { return r.json(); })
            .then(function(res) {
                if (res.completed || (!res.active && wasActive) ||
                    (!res.active && !res.queued && (Date.now() - started) / 1000 > inactivityTimeout)) {
                    finish();
                    return;
                }
                wasActive = wasActive || res.active;
                let text = res.progress > 0 ? (res.progress * 100).toFixed(0) + '%' : '';
                if (res.eta) text += ' ETA: ' + Math.round(res.eta) + 's';
                if (res.textinfo && res.textinfo.indexOf('\n') == -1) text = res.textinfo + ' ' + text;
                inner.style.width = ((res.progress || 0) * 100) + '%';
                inner.textContent = text;
                if (res.live_preview && gallery) {
                    if (!livePreview) {
                        livePreview = document.createElement('div');
                        livePreview.className = 'livePreview';
                        gallery.insertBefore(livePreview, gallery.firstElementChild);
                    }
                    const img = new Image();
                    img.src = res.live_preview;
                    livePreview.replaceChildren(img);
                    idLivePreview = res.id_live_preview;
                }
                if (onProgress) onProgress(res);
                setTimeout(poll, 500);
            })
            .catch(finish);
    };
    poll();
}
